"""The asyncio worker: lease due work in batches, deliver it, record results in batches.

One worker runs one event loop, with one **store loop** that makes every write the worker
makes. Each turn it records whatever delivery results exist (all that finished while the
last write ran: group commit) and, when work may be due and there is room, leases more,
both in one transaction (``Store.record_and_lease``: one fsync on SQLite). So a result
waits at most about one write for its record (the window in which a crash would make a
delivered recipient be sent again), a lease never delays a record, and one ``send_email``
does not turn into separate lease and record transactions. A store called in a thread
(PostgreSQL) records and leases in transactions of their own anyway: there a lease runs
beside the records, which go on while it waits for its answer. After a small lease, while
deliveries are in flight, leasing pauses a few milliseconds so that the next one collects
what arrived meanwhile. The worker never leases more than
``max(4 * max_connections, lease_batch)`` recipients ahead of delivery and counts
capacity per recipient: a stalled server holds only its own slots, and once the worker is
full the work queued behind a server that has not moved for ``_STALLED_AFTER`` seconds
goes back to the store for a minute, so that it holds no room of the others. Nor does it hold more
than ``max_leased_bytes`` of message data (and one message larger than what is left): the
store leases no more, and each message's data is let go once its recipients are
recorded, so a stalled server holds only its own messages. A **heartbeat** extends
the leases of work still in progress, so that a slow delivery is not taken over by
another worker; when it finds that one was taken over all the same (this worker or its
store stalled past the lease), the work of that lease not yet started goes back to the
store instead of being sent twice; and a lease it could not extend for 7/12 of
``lease_for`` (the store unreachable) starts none of its remaining work (fencing).

The store may fail for a while (a database restart, a write lock held by another process):
the worker keeps every result in memory, retries with backoff and goes on by itself; it
stops only for a :class:`~mailstrom.errors.StoreCorrupt` store or a bug, and
:attr:`Worker.status` says so. When idle it sleeps until the next due time, a wake-up
(:meth:`wake`, or the store's ``watch`` callback when mail is enqueued, from any process for
stores that can tell), or ``Config.poll_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from mailstrom.bounces.verp import per_recipient, wants_verp_key
from mailstrom.config import Config
from mailstrom.errors import StoreCorrupt, StoreError, StoreLocked, StoreRefusedData
from mailstrom.routing import Router
from mailstrom.runtime.dispatch import Dispatcher, lease_share
from mailstrom.runtime.metrics import MetricsRecorder
from mailstrom.runtime.outbox_others import warn_if_others_write_events
from mailstrom.runtime.outcomes import Outcomes
from mailstrom.runtime.shaper import Shaper
from mailstrom.runtime.suppressing import lane_bypass, screen
from mailstrom.runtime.tls_reporting import tls_reporting
from mailstrom.runtime.worker_clock import ClockVerdict, WorkerClock, danger_skew, lease_margin
from mailstrom.runtime.worker_destinations import WorkerDestinations
from mailstrom.runtime.worker_reaping import WorkerReaping
from mailstrom.runtime.worker_reporting import WorkerReporting, _Counters
from mailstrom.runtime.worker_retention import WorkerRetention
from mailstrom.runtime.worker_screening import RESCREEN_AFTER, WorkerScreening
from mailstrom.runtime.worker_stopping import WorkerStopping
from mailstrom.runtime.worker_store import RecordProgress, WorkerStore, _Backoff
from mailstrom.stores.base import (
    Lease,
    RecipientResult,
    RecordedNotLeased,
    Store,
    WorkItem,
    check_holder,
    domain_of,
    new_holder,
)
from mailstrom.stores.clock import ClockReading, in_utc
from mailstrom.stores.url import redact_url
from mailstrom.suppression import Suppression

if TYPE_CHECKING:
    from mailstrom.runtime.hooks import HookSender

log = logging.getLogger("mailstrom.worker")

_COALESCE = 0.005
"""Seconds to let work accumulate before the next lease, after a small one."""
_SMALL_LEASE = 32
"""A lease of fewer recipients than this is small."""
_RECORD_AFTER = 0.004
_RECORD_MANY = 128
"""Results wait at most this long (seconds), or until this many gather, for their write.
At full speed a write then carries ~43 results instead of ~24: a worker process delivers
9% faster (benchmarks/README.md), and a result is still committed within 10 ms of the
server's reply (p99 8.7 ms), the bound on what a crash can make us send twice."""


_STALLED_AFTER = 10.0
"""Seconds a destination's queue may wait without a session taking from it, while the
worker is full, before that queue goes back to the store (:meth:`Dispatcher.relieve`)."""
_STALLED_BACK_IN = timedelta(seconds=60)
"""How long work given back from behind a stalled destination stays in the store."""
_RELIEF_EVERY = 1.0
"""Seconds between two looks for stalled destinations while the worker is full."""
_Written = tuple[list[RecipientResult], Lease | None]
"""What ``record_and_lease`` returns."""
_CANCEL_GRACE = 10.0
"""Seconds past ``drain_if_cancelled`` after which a worker that took the end of its
event loop as a stop is cancelled for good (the last records, a hook's request)."""

_CUT_OFF = "may be taken over: its worker is cut off"
"""Why a lease is fenced while its worker is cut off (worker_reaping.py)."""


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True, eq=False)
class _LeaseCall:
    """What a lease of the store loop asked for, and what it knew when it asked."""

    limit: int
    lanes: list[tuple[str, int]]
    now: datetime
    wakeups: int
    """:attr:`Worker._wakeups` when it asked: one since may be for work it did not see."""
    ended: int
    """:attr:`Worker._ended` when it asked: a delivery ended since may have freed a lane or
    a destination it passed over."""
    max_bytes: int
    """The message data it may read (``Config.max_leased_bytes`` less what is held)."""
    busy: list[str]
    """The destinations whose work waiting in the dispatcher is enough (none leased)."""
    per_destination: int | None
    """The most recipients of one destination it takes (see :func:`lease_share`)."""


@dataclass(slots=True, eq=False)
class _HeldBytes:
    """The bytes of message data a worker's leases hold (see :class:`_HeldMessage`)."""

    now: int = 0
    peak: int = 0
    """The most they held at once since the worker was made."""

    def add(self, size: int) -> None:
        self.now += size
        self.peak = max(self.peak, self.now)


@dataclass(slots=True, eq=False)
class _HeldMessage:
    """A message of a lease with recipients not yet recorded: its work items (one per
    destination domain, sharing the message's data) and how many recipients are left.
    Its data stays in memory until then (a bounce notice quotes it), and counts against
    ``Config.max_leased_bytes``."""

    items: list[WorkItem]
    left: int
    size: int


@dataclass(slots=True, eq=False)
class _LeaseState:
    token: str
    held_bytes: _HeldBytes
    """The worker's count, which this lease's messages are in while it holds them."""
    unrecorded: int
    held_until: float
    """Loop time at which the lease expires as far as this worker knows (moved by each
    extension the store confirmed)."""
    expires_at: datetime
    """When it expires by this worker's clock (the store's view). The loop's clock is
    monotonic, which stops while the host is suspended: after a resume only this one
    tells that the lease ran out meanwhile."""
    extend_failed: bool = False
    """The heartbeat's last try to extend it failed."""
    writing: int = 0
    """Its recipients in a write under way (results, or a postponement): the store may
    have committed them before ``unrecorded`` says so."""
    fenced: bool = False
    """Its unstarted work was given back because it could not be extended in time."""
    screened_at: datetime | None = None
    """When the suppression list was last looked at for its recipients (by the worker's
    clock): at the lease, then again while its work waits (see :meth:`_may_start`)."""
    screening: asyncio.Future[None] | None = None
    """Done once the look at the list under way for its waiting work has been taken."""
    messages: dict[str, _HeldMessage] = field(default_factory=dict)
    """Its messages with recipients not yet recorded, by id: once a message's are, its
    items are let go, and its data with them, while the rest of the lease goes on (a
    lease of hundreds of messages kept them all in memory for one slow recipient)."""

    @property
    def lease(self) -> Lease:
        """What the lease still holds: the items of :attr:`messages` (for the store's
        ``extend`` and ``release``, which look at no other)."""
        items = tuple(item for held in self.messages.values() for item in held.items)
        return Lease(token=self.token, expires_at=self.expires_at, items=items)

    def hold(self, items: tuple[WorkItem, ...]) -> None:
        """Keep ``items`` (the lease's, as leased), their data counted."""
        messages = self.messages
        total = 0
        for item in items:
            held = messages.get(item.message_id)
            if held is None:
                size = len(item.data)
                messages[item.message_id] = _HeldMessage([item], len(item.recipients), size)
                total += size
            else:
                held.items.append(item)
                held.left += len(item.recipients)
        self.held_bytes.add(total)

    def let_go(self, message_id: str, count: int) -> None:
        """``count`` recipients of ``message_id`` are recorded (or given back): once none
        is left, its items and their data go."""
        held = self.messages.get(message_id)
        if held is None:
            return
        held.left -= count
        if held.left <= 0:
            del self.messages[message_id]
            self.held_bytes.now -= held.size

    def end(self) -> None:
        """The lease is over (nothing left to record, or the worker stops): let go of
        what it still holds."""
        self.held_bytes.now -= sum(held.size for held in self.messages.values())
        self.messages.clear()


async def _swept(task: asyncio.Task[None], drain: float | None) -> bool:
    """Whether ``task`` was cancelled by the sweep the worker outlived (``asyncio.run()``
    ending around it), and must be started again. One whose cancel is still pending is
    waited for (``drain`` seconds at most); one nobody cancelled (the worker's task alone
    was) runs on, and waited for, it held the drain its whole bound."""
    if not task.done() and task.cancelling():
        await asyncio.wait({task}, timeout=drain)
    return task.cancelled()


class Worker(
    WorkerReporting,
    WorkerScreening,
    WorkerDestinations,
    WorkerStopping,
    WorkerClock,
    WorkerReaping,
    WorkerRetention,
    WorkerStore,
):
    """Delivers everything due in ``store`` until stopped.

    Its parts beside the store loop live in ``worker_*.py``, mixed in over the state kept
    here: reporting, suppression and bounces, destinations, stopping, the clock check,
    the look for dead workers' leases, the retention of finished mail, store calls.

    >>> worker = Worker(Config(), store)           # doctest: +SKIP
    >>> await worker.run()                         # doctest: +SKIP
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        router: Router | None = None,
        clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
        on_result: Callable[[RecipientResult], None] | None = None,
        check_clock: bool | None = None,
        holder: str | None = None,
    ) -> None:
        """``on_result`` is called (on the worker's loop) with each result once the store
        has recorded it: a hook for metrics, logging or tests.

        ``holder``: this worker's identity in its lease tokens (8 to 32 lower-case hex
        digits; a fresh random one by default), by which
        :meth:`~mailstrom.stores.Store.release_holder` gives back all it leased should it
        die without giving them back itself: its parent process passes one it knows.
        Raises :class:`~mailstrom.errors.InvalidArgument` (a ValueError) for another value.

        ``check_clock``: whether to compare ``clock`` with the store server's and stop
        leasing when they are too far apart (worker_clock.py). By default only the host's
        own clock is checked: a clock passed in is a test's (a fixed or moved time is the
        point of it), and checking it against the server's would stop every lease."""
        self.config = config
        self.store = store
        self.holder = new_holder() if holder is None else check_holder(holder)
        """The identity every lease of this worker carries (see ``holder`` above)."""
        self._clock = in_utc(clock)
        self._checks_clock = clock is utc_now if check_clock is None else check_clock
        self._router = router or Router.for_config(config)
        self._inline = bool(getattr(store, "in_process", False))
        self._rng = rng or random.Random()
        self._on_result = on_result
        self._counters = _Counters()
        self.metrics = MetricsRecorder(domains=config.metrics_domains)
        """What this worker counted (see :attr:`status`'s ``metrics``)."""
        self._items: dict[tuple[str, str, str], int] = {}
        """Recipients not yet reported per work item in delivery: (lease, message, domain)."""
        self._running = False
        self._stopping = False
        self._drain_timeout: float | None = None
        """The shortest drain timeout a stop asked for (None: as long as it takes)."""
        self._drain_until: float | None = None
        """The soonest end of the drain a stop asked for, by ``time.monotonic()``."""
        self._stop_asked = False
        self._cut_short = False
        """Set by :meth:`cut_short`: the next cancel of the worker's task is its end."""
        self._cut_write: tuple[asyncio.Future[_Written], list[RecipientResult]] | None = None
        """The store loop's write under way in a thread as a cancel ended the loop, and its
        batch (see :meth:`_settle_cut_write`)."""
        self._grace_cancel: asyncio.TimerHandle | None = None
        self._retry_until = 0.0
        """Loop time after which a stopping worker stops retrying a failing write."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None
        self._closing = False
        self._lease_wanted = True
        self._dispatcher: Dispatcher | None = None
        self._beating = False  # the heartbeat is extending leases
        self._beat_now = asyncio.Event()  # asks the heartbeat for a beat at once
        self._stop_tightened = asyncio.Event()  # a stop asked for (again): see _drain
        self._confirming: asyncio.Future[None] | None = None  # see _may_start
        self._cancels_unchecked = False
        """Set (from any thread) by :meth:`check_leases` until a beat begins to ask the
        store what the leases still hold; ``_cancels_checking`` then, until that beat
        ends. No transaction starts meanwhile (:meth:`_may_start`)."""
        self._cancels_checking = False
        self._cancels_lock = threading.Lock()  # a cancel told while a beat takes the flag
        self._screenings: set[asyncio.Task[None]] = set()  # see _screen_again
        self._leases: dict[str, _LeaseState] = {}
        self._held_bytes = _HeldBytes()
        self._pending: list[RecipientResult] = []
        self._pending_since = 0.0
        self._starved = False
        self._stopped = threading.Event()
        self._hooks: HookSender | None = None
        self._shaper: Shaper | None = None
        self._postponing: set[asyncio.Task[None]] = set()
        self._due_at: datetime | None = None
        """When the earliest pending work not yet leased becomes due (a message sent with
        ``send_at``, a deferred retry), as last read from the store."""
        self._due_stale = True
        """Whether ``_due_at`` must be read again: after a lease found nothing due, and
        after a wake-up (new mail may be due earlier)."""
        self._once_asked = False
        """Whether a ``once`` run has asked ``next_due`` before ending (see _idle)."""
        self._lane_load: dict[str, int] = {}
        """Recipients leased and not yet delivered (or failed) per lane."""
        self._item_lanes: dict[tuple[str, str, str], str] = {}
        """The lane of each work item in delivery, by the key of ``_items``."""
        self._bypass = lane_bypass(config.lanes)
        """The suppression sources each lane's mail is sent past, for the lanes naming any."""
        self._empty_at: datetime | None = None
        """When a lease last found nothing to take: work due by then that it did not take
        (locked by another worker, in a lane without room) is no reason to lease again
        before a wake-up, a delivery ending or the poll."""
        self._capped = False
        """Whether the last lease left out a lane that had used up its share, or busy
        destinations (see :meth:`Dispatcher.busy`): their due work is not worth another
        lease until a delivery ends."""
        self._owing: dict[str, None] = {}
        """Ids of the messages this worker marked "notice owed" for whose notice it has
        not queued yet (oldest first; see worker_screening.MAX_OWING)."""
        self._owed_failed: asyncio.Event | None = None
        """Set when queueing owed notices failed: the look for them comes again soon."""
        self._verp_key: bytes | None = None
        """The store's VERP key: the tokens of VERP envelope senders are made with it.
        Read when the first VERP message is leased, so that a store failing while the
        worker starts does not stop it, and a worker without VERP mail never asks."""
        self._wakeups = 0
        """Wake-ups so far. One that comes while a lease runs (in a thread, for PostgreSQL)
        may be for work that lease did not see, so it keeps the next lease wanted."""
        self._ended = 0
        """Work items whose results came back (see :attr:`_LeaseCall.ended`)."""
        self._clock_reading: ClockReading | None = None
        """The latest comparison of our clock with the store server's (worker_clock.py);
        None for a store that shares our clock, or before the first check answered."""
        self._clock_verdict = ClockVerdict.FINE
        """What that reading means: STOP pauses leasing."""
        self._clock_checked: asyncio.Event | None = None
        """Set once the first clock check has ended: the first lease waits for it."""

    @property
    def _leasing_paused(self) -> bool:
        """The store loop leases nothing: our clock is too far from the store server's
        (worker_clock.py), or we are cut off from a store whose other workers may take us
        for dead (worker_reaping.py)."""
        return self._clock_stops_leasing or self._cut_off is not None

    # --- control, callable from any thread -------------------------------------------------

    def wake(self) -> None:
        """Look for due work now (thread-safe)."""
        self._call_soon(self._poke)

    def check_leases(self) -> None:
        """Extend the leases now, as the heartbeat does (thread-safe): work of them that
        was cancelled, held or suspended meanwhile is then given back, not started. Called
        when the store says so of leased recipients (``Store.watch_cancels``), by any
        process; unasked, the heartbeat found it only at its next beat (every third of
        ``lease_for``), and the work went out before. Until that beat has asked, no
        transaction starts (:meth:`_may_start`): set here, before the store's cancel
        returns (the store calls this from it), a session that started the cancelled
        mail in the beat's round trip sent it after ``cancel()`` had said it would not
        go."""
        with self._cancels_lock:
            self._cancels_unchecked = True
        self._call_soon(self._beat_now.set)

    def _watch(self) -> Callable[[], None] | None:
        """Have the store call :meth:`wake` when mail is queued; None when it cannot now
        (PostgreSQL's LISTEN connection refused: connections exhausted, a server going
        away). The poll finds the mail then, as it is there for: failing the worker's
        start for it stopped delivery from a store that answered every other call."""
        try:
            return self.store.watch(self.wake)
        except StoreCorrupt:
            raise
        except StoreError as exc:
            log.warning(
                "not woken when mail is queued (looking every %g s instead): %s",
                self.config.poll_interval,
                exc,
            )
            return None

    def _watch_cancels(self) -> Callable[[], None] | None:
        """Have the store call :meth:`check_leases` when leased mail is cancelled; None
        when it cannot (the heartbeat still finds the cancel, later)."""
        watch = getattr(self.store, "watch_cancels", None)
        if watch is None:  # a store of its own kind, older than the method
            return None
        try:
            stop: Callable[[], None] = watch(self.check_leases)
        except StoreError as exc:
            log.warning("not told of cancelled mail at once: %s", exc)
            return None
        return stop

    def request_stop(self, drain_timeout: float | None = None) -> None:
        """Stop leasing (thread-safe). In-flight deliveries get ``drain_timeout`` seconds
        to finish (None: as long as they take); what is unfinished then is given back to
        the store, due at once, and ``run`` returns. Called again (an impatient second
        stop), the shortest deadline asked for wins at once, the drain under way included;
        a longer one extends nothing."""
        self._tighten_stop(drain_timeout)
        self._stopping = True
        self._call_soon(functools.partial(self._stop_now, drain_timeout))

    def _call_soon(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed since the check
            loop.call_soon_threadsafe(callback)

    def _poke(self) -> None:
        self._wakeups += 1
        self._lease_wanted = True
        self._due_stale = True
        if self._wake is not None:
            self._wake.set()

    def _stop_now(self, drain_timeout: float | None = None) -> None:
        # Again on the loop: a stop racing another from a second thread may have lost,
        # and the last records' retries (loop time) shorten here.
        self._tighten_stop(drain_timeout)
        if self._closing and drain_timeout is not None:
            now = asyncio.get_running_loop().time()
            self._retry_until = min(self._retry_until, now + max(0.0, drain_timeout))
        self._stop_tightened.set()
        if self._stop_event is not None:
            self._stop_event.set()
        if self._wake is not None:
            self._wake.set()

    def cut_short(self) -> None:
        """The cancel about to be made of the worker's task (a stop() past its bound, a
        start() given up) is its end, not one to outlive as :meth:`_outlive_cancel` does
        (thread-safe: call it before that cancel, from any thread)."""
        self._cut_short = True

    def _outlive_cancel(self, drain: float | None) -> bool:
        """Whether the worker's task, cancelled by nobody who meant it to end now
        (``asyncio.run()`` ending around it, a stop() under way included, whose own cancel
        past its bound is marked by :meth:`cut_short`), takes that as a stop draining
        ``drain`` seconds at most (the caller allows it) rather than end mid-delivery."""
        task = asyncio.current_task()
        if drain is None or self._cut_short or task is None or not task.cancelling():
            return False
        # Every cancel pending, not one only: a main that cancels the tasks left itself
        # and returns has asyncio.run() cancel them again, and the worker, cancelled
        # twice, ended mid-delivery (the mail whose reply it lost went out again).
        while task.uncancel():
            pass
        self._tighten_stop(drain)
        self._stopping = True
        self._stop_now(drain)
        if self._grace_cancel is None:
            log.warning(
                "the worker task was cancelled with no stop() ending it (the event loop "
                "ending?): deliveries in flight get %g s at most to finish",
                drain,
            )
            # Never the exit held for ever: past the drain and a grace for the last
            # records (a store that hangs), cancelled for good, as stop() cancels a task
            # past its bound.
            self._grace_cancel = asyncio.get_running_loop().call_later(
                drain + _CANCEL_GRACE, self._cancel_for_good, task
            )
        return True

    def _cancel_for_good(self, task: asyncio.Task[None]) -> None:
        self.cut_short()
        task.cancel()

    def responsive(self, timeout: float = 2.0) -> bool:
        """Whether the worker runs and its event loop answers within ``timeout`` seconds
        (thread-safe; for health checks from another thread). A loop stuck in a blocking
        call, or a worker that stopped, is not responsive."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self._running:
            return False
        answered = threading.Event()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # closed since the check
            return False
        return answered.wait(timeout)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until ``run`` has returned (for whatever reason); False on timeout."""
        return self._stopped.wait(timeout)

    # --- the loops ---------------------------------------------------------------------

    async def run(
        self,
        *,
        once: bool = False,
        on_started: Callable[[], None] | None = None,
        drain_if_cancelled: float | None = None,
    ) -> None:
        """Deliver until :meth:`request_stop`; with ``once``, until nothing is due now.

        ``on_started`` is called once the worker is set up and can take wake-ups. With
        ``drain_if_cancelled``, a cancel no stop asked for (``asyncio.run()`` ending with
        this worker's task still running, which cancels every task) is taken as a stop
        with that drain timeout: a reply owed to a final dot is waited for and recorded,
        what was not sent goes back to the store.
        """
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._stop_tightened = asyncio.Event()
        self._confirming = None
        self._cancels_unchecked = self._cancels_checking = False  # no lease is held yet
        self._put_back_cut_write()  # one an earlier run's last cancel left: unrecorded
        self._cut_short = False
        self._grace_cancel = None
        if self._stopping:
            self._stop_event.set()
        self._running = True
        self._closing = False
        self._lease_wanted = True
        self._unusable = None
        self._stopped.clear()
        self._counters.started_at = self._clock()
        outcomes = Outcomes(self.config, clock=self._clock, rng=self._rng)
        shaper = self._shaper = Shaper(
            self.config, self.store, store_call=self._store_call, clock=self._clock
        )
        hook, tls_sessions, observe_tls, dane_failed = tls_reporting(
            self.config, self.store, store_call=self._store_call, clock=self._clock
        )
        tls = self._tls_decider(mta_sts=hook, dane_failed=dane_failed)
        dispatcher = self._dispatcher = Dispatcher(
            self.config,
            router=self._router,
            outcomes=outcomes,
            on_done=self._on_done,
            tls=tls,
            observe_tls=observe_tls,
            shaper=shaper,
            on_postpone=self._on_postpone,
            may_start=self._may_start,
        )
        dispatcher.hold_cancels = drain_if_cancelled is not None
        reporting = None
        if tls_sessions is not None:
            reporting = asyncio.create_task(tls_sessions.run(), name="mailstrom-tlsrpt")
        unwatch: Callable[[], None] | None = None
        unwatch_cancels: Callable[[], None] | None = None
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="mailstrom-heartbeat")
        fencing = asyncio.create_task(self._fence_loop(), name="mailstrom-fencing")
        self._clock_checked = asyncio.Event()
        clock_check = asyncio.create_task(self._clock_loop(), name="mailstrom-clock")
        reaping = asyncio.create_task(self._reap_loop(), name="mailstrom-reaping")
        tls_memory = asyncio.create_task(
            self._tls_memory_loop(tls.broken), name="mailstrom-tls-memory"
        )
        pauses = asyncio.create_task(self._pauses_loop(shaper), name="mailstrom-pauses")
        owed = asyncio.create_task(self._owed_loop(), name="mailstrom-notices")
        pruning = asyncio.create_task(self._prune_loop(), name="mailstrom-pruning")
        idle_closing = asyncio.create_task(
            self._idle_connections_loop(dispatcher), name="mailstrom-idle-connections"
        )
        retention = asyncio.create_task(self._retention_loop(), name="mailstrom-retention")
        loops = (
            heartbeat,
            fencing,
            clock_check,
            reaping,
            tls_memory,
            pauses,
            owed,
            pruning,
            retention,
            idle_closing,
        )
        for task in loops:
            task.add_done_callback(self._loop_ended)
        store_loop: asyncio.Task[None] | None = None
        hooks: asyncio.Task[None] | None = None
        failed = True
        try:
            if self.config.outbox:
                # From here on every record also writes its events, in the same transaction.
                self.store.enable_events()
            else:
                await warn_if_others_write_events(
                    self.store, store_call=self._store_call, now=self._clock()
                )
            if self.config.hook is not None:
                # Loaded only here: HTTP (urllib, http.client) is for workers with a hook.
                from mailstrom.runtime.hooks import HookSender

                self._hooks = HookSender(
                    self.config.hook,
                    self.store,
                    store_call=self._store_call,
                    clock=self._clock,
                    metrics=self.metrics,
                    poll_interval=self.config.poll_interval,
                    rng=self._rng,
                )
                hooks = asyncio.create_task(self._hooks.run(), name="mailstrom-hooks")
            unwatch = self._watch()
            unwatch_cancels = self._watch_cancels()
            store_loop = asyncio.create_task(
                self._store_loop(dispatcher, once=once), name="mailstrom-store"
            )
            if on_started is not None:
                on_started()
            stopping = asyncio.create_task(self._stop_event.wait(), name="mailstrom-stop")
            cut = revive = False
            while True:
                try:
                    if revive:
                        # The same sweep cancelled the store loop and the heartbeat:
                        # without them nothing the drain brings in is recorded, nor a
                        # lease extended meanwhile. Here, not in the handler below: a
                        # second cancel (a main that cancelled the tasks left, then
                        # asyncio.run's own) reached the handler's waits and ended the
                        # worker mid-delivery.
                        heartbeat = await self._heartbeat_after_sweep(heartbeat, drain_if_cancelled)
                        loops = (heartbeat, *loops[1:])
                        store_loop = await self._store_loop_after_sweep(
                            store_loop, dispatcher, once=once, drain=drain_if_cancelled
                        )
                        hooks = await self._hook_sender_after_sweep(hooks, drain_if_cancelled)
                        revive = False
                    if not stopping.done():
                        await asyncio.wait(
                            {store_loop, stopping}, return_when=asyncio.FIRST_COMPLETED
                        )
                    stopping.cancel()
                    if store_loop.done():
                        store_loop.result()  # a fatal error: raise it here
                    # What waits for a destination's rate is not in flight: back to the
                    # store now.
                    dispatcher.drain()
                    await self._drain(dispatcher, store_loop, cut=cut)
                    break
                except asyncio.CancelledError:
                    # Also in the drain of a stop() that was itself cancelled (a main that
                    # gave up waiting for it, then returned): the reply owed was lost.
                    if not self._outlive_cancel(drain_if_cancelled):
                        raise
                    cut = revive = True
            failed = False
        except BaseException as exc:
            if not (isinstance(exc, asyncio.CancelledError) and self._stopping):
                # A cancel after a stop was asked for is that stop's own end (a facade's
                # stop() past its bound, the command's second signal), no error: the
                # worker read as dead of "CancelledError", where a worker process a stop
                # killed reads as stopped.
                # Any error, a driver's quoting its connection string among them.
                self._counters.error = redact_url(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            for screening in self._screenings:
                screening.cancel()
            heartbeat.cancel()
            fencing.cancel()
            clock_check.cancel()
            reaping.cancel()
            tls_memory.cancel()
            pauses.cancel()
            owed.cancel()
            pruning.cancel()
            retention.cancel()
            idle_closing.cancel()
            self._stopping = True
            try:
                await asyncio.gather(*loops, return_exceptions=True)
                if self._clock_checked is not None:
                    # The clock loop says so itself when cancelled, but not one cancelled
                    # before it ever ran (``on_started`` raised at once): the store loop
                    # waited for it, and the stop for the store loop, until the last
                    # records' time ran out.
                    self._clock_checked.set()
                if unwatch is not None:
                    unwatch()
                if unwatch_cancels is not None:
                    unwatch_cancels()
                revive = False
                while True:
                    try:
                        if revive and store_loop is not None:
                            store_loop = await self._store_loop_after_sweep(
                                store_loop, dispatcher, once=once, drain=drain_if_cancelled
                            )
                            hooks = await self._hook_sender_after_sweep(hooks, drain_if_cancelled)
                            revive = False
                        await dispatcher.close()
                        if store_loop is not None:
                            await self._finish_recording(store_loop)
                        break
                    except asyncio.CancelledError:
                        # The loop's end reached a stop's last records (a main that gave
                        # up waiting for stop(), then returned): the results still to
                        # write were dropped, unlogged, their leases kept, and the next
                        # worker sent the mail again. Outlived as in the drain above.
                        if store_loop is None or not self._outlive_cancel(drain_if_cancelled):
                            raise
                        revive = True
                if hooks is not None:
                    await self._stop_hooks(hooks, flush=not failed)
                if self._postponing:
                    await asyncio.gather(*self._postponing, return_exceptions=True)
            finally:
                # Also when a step above was cancelled (``mailstrom worker``'s second
                # signal: stop at once): what was leased and never attempted goes back,
                # due at once, rather than wait for its lease to expire.
                try:
                    if store_loop is not None and not store_loop.done():
                        store_loop.cancel()  # it leases nothing behind the give-back
                        await asyncio.gather(store_loop, return_exceptions=True)
                    # A write cut off in its thread and never settled (a step above was
                    # cancelled): its results count as unrecorded, their leases kept, not
                    # given back due at once while delivered mail may be in that write.
                    self._put_back_cut_write()
                    await self._release_unfinished()
                    if hooks is not None and not hooks.done():
                        # A hook sender the drain started again, when the stop was cut
                        # short before _stop_hooks: asyncio.run() waits only for the tasks
                        # it cancelled, and this one went on polling the outbox (a later
                        # run on this worker started a second, posting events twice).
                        # After the give-back, which a cancel in this wait must not skip.
                        hooks.cancel()
                        await asyncio.gather(hooks, return_exceptions=True)
                        self._hooks = None
                    if reporting is not None and tls_sessions is not None:
                        reporting.cancel()
                        await asyncio.gather(reporting, return_exceptions=True)
                        await tls_sessions.flush()
                finally:
                    if self._grace_cancel is not None:
                        self._grace_cancel.cancel()  # not a later run's task's end
                    self._running = False
                    self._stopped.set()

    async def _store_loop(self, dispatcher: Dispatcher, *, once: bool) -> None:
        """Every write the worker makes: record what finished, and lease what is due, in
        one transaction when both are wanted (see the module docstring). A store called in
        a thread (PostgreSQL) makes them transactions of their own anyway: there the lease
        runs beside the records, so that results coming back meanwhile do not wait for it."""
        assert self._wake is not None and self._loop is not None
        config = self.config
        loop = self._loop
        # Keep enough work in flight to fill every session, but no more: work leased and
        # waiting in memory is work no other worker can take.
        high_water = max(config.max_connections * 4, config.lease_batch)
        # And no more message data than max_leased_bytes (a queue of large messages made
        # a lease hold hundreds of them: gigabytes, and the OOM killer stopped delivery).
        byte_budget = config.max_leased_bytes
        # Each lane may hold its share of the recipients in flight (bulk cannot fill the
        # worker and leave no room for transactional mail leased after it).
        lane_caps = [(lane.name, max(1, int(lane.share * high_water))) for lane in config.lanes]
        # And no more than a share of one destination, none of one with half that waiting:
        # a slow destination's backlog filled the worker, and mail to every other
        # destination queued after it waited for most of that backlog.
        share = lease_share(config, high_water)
        enough = high_water if share is None else max(1, share // 2)
        backoff = _Backoff()
        lease_backoff = _Backoff()
        not_before = 0.0  # no lease before this loop time (gathering a batch)
        relief_at = 0.0  # no look for stalled destinations before this loop time
        # A lease running beside the records, and what it asked for.
        beside: tuple[asyncio.Future[Lease | None], _LeaseCall] | None = None
        if self._clock_checked is not None:
            await self._clock_checked.wait()  # no lease before our clock is known to be fit
        try:
            while True:
                if self._unusable is not None:
                    # Found by another call (see _store_unusable), or a loop beside this
                    # one crashed (_loop_ended).
                    raise self._unusable
                self._wake.clear()
                if beside is not None and beside[0].done():
                    (task, call), beside = beside, None
                    try:
                        lease = task.result()
                    except StoreCorrupt:
                        raise
                    except StoreError as exc:
                        self._store_trouble("lease", exc)
                        not_before = loop.time() + lease_backoff.take()
                        continue
                    lease_backoff.reset()
                    self._store_fine(but="record")
                    if await self._took(lease, call, dispatcher, backoff):
                        not_before = loop.time() + _COALESCE
                    continue
                # Leased and not yet recorded: in flight, or delivered and waiting for the
                # write (or being leased beside the records).
                room = high_water - dispatcher.in_flight - len(self._pending)
                if beside is not None:
                    room -= beside[1].limit
                byte_room = byte_budget - self._held_bytes.now
                self._starved = room <= 0 or byte_room <= 0
                if self._starved and loop.time() >= relief_at:
                    # Full: perhaps of work waiting behind a server that does not move,
                    # which holds room no other destination can use. Its queue goes back
                    # to the store for a while (a stalled server holds its sessions only).
                    relief_at = loop.time() + _RELIEF_EVERY
                    if dispatcher.relieve(_STALLED_AFTER, _STALLED_BACK_IN):
                        continue
                leasing = (
                    self._lease_wanted
                    and not self._starved
                    and beside is None
                    and not self._stopping
                    and not self._leasing_paused
                )
                if leasing and loop.time() >= not_before and self._clock_stepped():
                    if not await self._check_clock_if_stepped():
                        # The step stays seen, and no lease trusts the clock before a
                        # check succeeds: tried again after the backoff, records meanwhile.
                        not_before = loop.time() + lease_backoff.take()
                    continue  # the verdict may pause leasing now
                if leasing and loop.time() < not_before:
                    if not self._pending:
                        await self._sleep(not_before - loop.time())  # a record cuts it short
                        continue
                    leasing = False  # results never wait for the batch to gather
                if self._pending and not leasing and not self._closing and dispatcher.in_flight:
                    # Gather results for a moment (bounded: the duplicate window after a
                    # crash is this plus one write) so that each write records a batch.
                    # With nothing in flight no result is coming to join them: they are
                    # written at once.
                    wait = self._pending_since + _RECORD_AFTER - loop.time()
                    if wait > 0 and len(self._pending) < _RECORD_MANY:
                        await self._sleep(wait)
                        continue
                if not self._pending and not leasing:
                    if beside is not None:
                        await self._sleep(config.poll_interval)  # its end wakes us
                        continue
                    if self._closing or (self._stopping and dispatcher.idle.is_set()):
                        await self._owed_once_more()
                        return
                    if await self._idle(dispatcher, once=once):
                        await self._owed_once_more()
                        return
                    continue
                batch, self._pending = self._pending, []
                limit = min(room, config.lease_batch) if leasing else 0
                load = self._lane_load
                lanes = [(name, max(0, cap - load.get(name, 0))) for name, cap in lane_caps]
                call = _LeaseCall(
                    limit=limit,
                    lanes=lanes,
                    now=self._clock(),
                    wakeups=self._wakeups,
                    ended=self._ended,
                    max_bytes=byte_room,
                    busy=dispatcher.busy(enough) if leasing else [],
                    per_destination=share,
                )
                if leasing and not self._inline:
                    beside = (self._lease_beside(call), call)
                    leasing, limit = False, 0
                    if not batch:
                        continue
                self._writing(batch, 1)
                try:
                    recorded, lease = await self._kept_call(
                        self.store.record_and_lease,
                        batch,
                        now=call.now,
                        limit=limit,
                        lease_for=config.lease_for,
                        lanes=lanes,
                        holder=self.holder,
                        max_bytes=call.max_bytes,
                        busy=call.busy,
                        per_destination=call.per_destination,
                    )
                except StoreCorrupt:
                    self._unwritten(batch)
                    raise
                except StoreError as exc:
                    doing = "record" if batch else "lease"
                    if isinstance(exc, RecordedNotLeased):
                        # Written: the lease alone failed. Writing the batch again would
                        # find it recorded and read it as taken over (no on_result, no
                        # notices).
                        await self._after_record(batch, exc.recorded)
                        exc, doing = exc.cause, "lease"
                        if isinstance(exc, StoreCorrupt):
                            raise exc from None
                    elif batch and isinstance(exc, StoreRefusedData):
                        trouble = await self._record_refused(batch)
                        if trouble is None:  # all written; lease on the next turn
                            backoff.reset()
                            self._store_fine()
                            continue
                        exc = trouble
                    else:
                        self._unwritten(batch)
                    self._store_trouble(doing, exc)
                    if self._closing and loop.time() >= self._retry_until:
                        return  # the drain timeout is spent: what is left is reported
                    await self._sleep(backoff.take())
                    continue
                except BaseException:
                    cut, self._cut_call = self._cut_call, None
                    if cut is not None and batch:
                        # Cancelled (asyncio.run ending) while the write goes on in its
                        # thread: written again, it would read as taken over, on_result
                        # never called. See _settle_cut_write.
                        self._cut_write = (cut, batch)
                    else:
                        self._unwritten(batch)
                    raise
                backoff.reset()
                self._store_fine(but=None if self._inline else "lease")
                await self._after_record(batch, recorded)
                if leasing and await self._took(lease, call, dispatcher, backoff):
                    not_before = loop.time() + _COALESCE
        finally:
            # Stopped at once, or failed: a lease running is dropped, its recipients
            # waiting for its expiry (as when the loop stopped in a call with a lease).
            if beside is not None and not beside[0].cancel() and not beside[0].cancelled():
                beside[0].exception()  # ended meanwhile: its outcome goes with it

    async def _heartbeat_after_sweep(
        self, heartbeat: asyncio.Task[None], drain: float | None
    ) -> asyncio.Task[None]:
        """The heartbeat once the worker outlived a cancel (:func:`_swept`), started again
        before the store loop: leases are extended while a write cut off is waited for."""
        if not await _swept(heartbeat, drain):
            return heartbeat
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="mailstrom-heartbeat")
        heartbeat.add_done_callback(self._loop_ended)
        return heartbeat

    async def _store_loop_after_sweep(
        self,
        store_loop: asyncio.Task[None],
        dispatcher: Dispatcher,
        *,
        once: bool,
        drain: float | None,
    ) -> asyncio.Task[None]:
        """The store loop once the worker outlived a cancel in its last records
        (:func:`_swept`): nothing else writes what is pending. Its write cut off is
        settled before it starts again."""
        swept = await _swept(store_loop, drain)
        await self._settle_cut_write(drain)
        if not swept:
            return store_loop
        return asyncio.create_task(self._store_loop(dispatcher, once=once), name="mailstrom-store")

    async def _hook_sender_after_sweep(
        self, hooks: asyncio.Task[None] | None, drain: float | None
    ) -> asyncio.Task[None] | None:
        """The hook sender's task once the worker outlived a cancel (:func:`_swept`): the
        events of what the drain records waited in the outbox for some later worker (none,
        for a program run once) where a stop() posts them."""
        if hooks is None or self._hooks is None or not await _swept(hooks, drain):
            return hooks
        return asyncio.create_task(self._hooks.run(), name="mailstrom-hooks")

    async def _owed_once_more(self) -> None:
        """Before the store loop ends: notices owed whose queueing failed are asked for
        once more (their marks stay in the store if that fails too: the next worker
        queues them)."""
        if self._owed_failed is not None and self._owed_failed.is_set():
            self._owed_failed.clear()
            await self._send_owed(None)

    def _lease_beside(self, call: _LeaseCall) -> asyncio.Future[Lease | None]:
        """Start ``call``'s lease in a task of its own; its end wakes the store loop."""
        task = asyncio.ensure_future(self._lease_alone(call))
        wake = self._wake
        assert wake is not None
        task.add_done_callback(lambda _: wake.set())
        return task

    async def _lease_alone(self, call: _LeaseCall) -> Lease | None:
        """``call``'s lease: a ``record_and_lease`` with nothing to record, the one store
        call of the loop, as a lease with results."""
        _, lease = await self._store_call(
            self.store.record_and_lease,
            [],
            now=call.now,
            limit=call.limit,
            lease_for=self.config.lease_for,
            lanes=call.lanes,
            holder=self.holder,
            max_bytes=call.max_bytes,
            busy=call.busy,
            per_destination=call.per_destination,
        )
        return lease

    async def _took(
        self, lease: Lease | None, call: _LeaseCall, dispatcher: Dispatcher, backoff: _Backoff
    ) -> bool:
        """Start the work of a lease ``call`` made (None: it found nothing due). True when
        it was small while deliveries are in flight: the next lease waits a moment for
        more work to come due."""
        # Passed over busy destinations too: their due work waits for a delivery to end.
        self._capped = bool(call.busy) or any(most == 0 for _, most in call.lanes)
        if lease is None:
            # Else lease again: new work may have come, or a delivery that ended while the
            # store looked freed a lane or a busy destination the lease passed over (with
            # every delivery ended meanwhile, no result to come would ask for a lease, and
            # their due work waited for the poll).
            if self._wakeups == call.wakeups and not (self._capped and self._ended != call.ended):
                self._lease_wanted = False  # nothing due: wait for a wake-up or due time
            self._due_stale = True
            # The time the lease looked at, not the clock after it: work that came due
            # while the store looked was not seen, and its due time must still wake us.
            self._empty_at = call.now
            return False
        if lease.failed:
            self._report_set_aside(lease.failed)
        if not lease.items:
            return False  # only recipients set aside: lease again at once
        if self._stopping:
            # A lease that ran beside the records when the stop was asked for: its work
            # is no delivery in flight, and goes back now, as what the stop finds leased
            # and never attempted does (started, it went out during the drain, and what
            # the drain's end cut off went out again).
            with contextlib.suppress(StoreError):  # else it waits for its expiry
                await self._store_call(self.store.release, lease)
            return False
        found = lease.suppressions
        if found is None:  # not read with the lease: ask
            found = await self._suppressed_in(lease)
        while found is None and not self._closing:
            # The lease stays ours (it is long, and giving it back needs the very store
            # that just failed): ask again once the store answers. Dropping it instead
            # stranded its recipients until the lease expired.
            await asyncio.sleep(backoff.take())
            found = await self._suppressed_in(lease)
        keyless = self._verp_key is None and wants_verp_key(lease)
        if found is not None and keyless:
            self._verp_key = await self._read_verp_key()
            keyless = self._verp_key is None
        if found is None or keyless:
            with contextlib.suppress(StoreError):  # closing before the store answered
                await self._store_call(self.store.release, lease)
            return False
        backoff.reset()
        return self._start(lease, dispatcher, found) < _SMALL_LEASE and bool(dispatcher.in_flight)

    async def _read_verp_key(self) -> bytes | None:
        """The store's VERP key, asked again with backoff while the store fails (the
        lease waiting for it stays ours, as while its suppressions are read). None when
        the worker closes first."""
        backoff = _Backoff()
        while not self._closing:
            try:
                return await self._store_call(self.store.verp_key)
            except StoreCorrupt:
                raise
            except StoreError as exc:
                self._store_trouble("VERP key", exc)
                await asyncio.sleep(backoff.take())
        return None

    async def _sleep(self, seconds: float) -> None:
        """Until ``seconds`` pass or something happens (a result, a wake-up, a stop)."""
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(seconds, 0.0))

    async def _idle(self, dispatcher: Dispatcher, *, once: bool) -> bool:
        """Nothing to write: sleep until work may be due. True when ``once`` is done.

        The sleep ends at the earliest due time of work not yet leased (a scheduled
        message, a retry), read from the store once after each empty lease or wake-up and
        remembered while deliveries run (brought forward by the retries the worker
        records and the work it gives back meanwhile), so a busy worker neither asks the
        store on every turn nor sleeps past a due time until the next poll."""
        timeout = self.config.poll_interval
        waits_for: datetime | None = None
        if once and dispatcher.idle.is_set():
            # The last lease found nothing due, and nothing is in flight. Ask next_due once
            # before ending: a pending recipient without a due time (a row changed by hand)
            # is made due only there, and a run that never asked it would leave it queued
            # at every `mailstrom worker --once`. Once only: work next_due calls due and no
            # lease takes (a suspended destination) must not keep the run going.
            if self._once_asked:
                return True
            self._once_asked = True
            now = self._clock()
            try:
                due = await self._store_call(self.store.next_due, now=now)
            except StoreCorrupt:
                raise
            except StoreError as exc:
                self._store_trouble("next_due", exc)
                return True
            if due is None or due > now:
                return True
            self._lease_wanted = True
            return False
        # Paused (a wrong clock), no due time is worth waking up for: only the poll, a
        # wake-up, a result or the clock check that ends the pause.
        if (
            not self._starved
            and not self._capped
            and not self._stopping
            and not self._leasing_paused
        ):
            if self._due_stale or dispatcher.idle.is_set():
                try:
                    self._due_at = await self._store_call(self.store.next_due, now=self._clock())
                    self._due_stale = False
                except StoreCorrupt:
                    raise
                except StoreError as exc:
                    self._store_trouble("next_due", exc)
                    self._due_at = None
            due = self._due_at
            if due is not None and (self._empty_at is None or due > self._empty_at):
                until_due = max(0.0, (due - self._clock()).total_seconds())
                if until_due < timeout:
                    timeout, waits_for = until_due, due
            if timeout <= 0:
                self._lease_wanted = True
                self._due_stale = True
                return False
        if self._starved:
            timeout = min(timeout, _RELIEF_EVERY)  # to look for stalled destinations
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        poll_at = loop.time() + self.config.poll_interval
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
                return False
            except TimeoutError:
                if waits_for is not None:
                    # The timer may fire before the due time by the clock (uvloop rounds
                    # timers to the millisecond; the clock may run slow): sleep the rest,
                    # as a lease would find nothing, but not past the poll. A clock that
                    # lags the loop's (stepped back, or a test's that stands still) was
                    # otherwise waited for past every poll, and work given back meanwhile
                    # without a wake-up waited with it.
                    timeout = min(
                        (waits_for - self._clock()).total_seconds(), poll_at - loop.time()
                    )
                    if timeout > 0:
                        continue
                self._lease_wanted = True  # the poll, or the due time came
                self._due_stale = True
                return False

    def _start(
        self, lease: Lease, dispatcher: Dispatcher, suppressed: Mapping[str, Suppression]
    ) -> int:
        count = sum(len(item.recipients) for item in lease.items)
        left = (lease.expires_at - self._clock()).total_seconds()
        state = self._leases[lease.token] = _LeaseState(
            token=lease.token,
            held_bytes=self._held_bytes,
            unrecorded=count,
            held_until=asyncio.get_running_loop().time() + left,
            expires_at=lease.expires_at,
            screened_at=self._clock(),
        )
        state.hold(lease.items)
        items = self._items
        load = self._lane_load
        now = self._clock()
        for item in lease.items:
            key = (lease.token, item.message_id, item.domain)
            items[key] = len(item.recipients)
            self._item_lanes[key] = item.priority
            load[item.priority] = load.get(item.priority, 0) + len(item.recipients)
            rest, refused = screen(item, suppressed, now=now, bypass=self._bypass)
            if refused:
                self._on_done(refused)  # failed at once, recorded with the next write
            if rest is not None:
                # A VERP message is one transaction per recipient (its own envelope sender).
                for part in per_recipient(rest, key=self._verp_key or b""):
                    dispatcher.submit(part)
        if self._cut_off:  # leased by a call that began before: no session has it yet
            self._fence(state, _CUT_OFF)
        return count

    def _on_done(self, results: list[RecipientResult]) -> None:
        """An item's results: to the store loop at once (the duplicate window starts). A
        result owing its sender a notice (a bounce, a delay warning, a "relayed" notice)
        goes with what the notice will say, for the store to mark."""
        if not self._pending and self._loop is not None:
            self._pending_since = self._loop.time()
        if results:
            self._ended += 1
            if any(self._may_owe_notice(r) for r in results):
                results = self._with_notices(results)
            first = results[0]
            key = (first.lease_token, first.message_id, domain_of(first.address))
            left = self._items.get(key)
            if left is not None:
                lane = self._item_lanes.get(key, "")
                self._lane_load[lane] = max(0, self._lane_load.get(lane, 0) - len(results))
                if left > len(results):
                    self._items[key] = left - len(results)
                else:
                    del self._items[key]
                    self._item_lanes.pop(key, None)
        self._pending.extend(results)
        if self._starved or self._capped:
            self._lease_wanted = True  # room for more work
        assert self._wake is not None
        self._wake.set()

    async def _record_refused(self, batch: list[RecipientResult]) -> StoreError | None:
        """Write a batch whose write the store refused, one result at a time (see
        :meth:`_record_apart`); what is not written waits for the next write. Returns the
        passing error that stopped the writing, if one did."""
        progress = RecordProgress()
        try:
            done, recorded, trouble = await self._record_apart(batch, progress)
        except BaseException:
            # Cancelled mid-way (the worker's end): what was written is taken in (its
            # on_result), the rest waits as unrecorded, its leases kept to expire, not
            # given back due at once with delivered mail in it. (A write still running
            # in its thread may commit its result: that one then reads as taken over.)
            self._unwritten(batch[progress.done :])
            if progress.done:  # taken in as any write is (suppressions, on_result, notices)
                await self._after_record(batch[: progress.done], progress.recorded)
            raise
        self._unwritten(batch[done:])
        await self._after_record(batch[:done], recorded)
        if isinstance(trouble, StoreCorrupt):
            raise trouble
        return trouble

    async def _after_record(
        self, batch: list[RecipientResult], recorded: list[RecipientResult]
    ) -> None:
        """What follows a write of ``batch``: suppressions, notices, the worker's own
        account of its leases, and the hook sender's wake-up."""
        if not batch:
            return
        # Before on_result hears of a hard bounce, its address is on the list.
        await self._suppress_hard_bounces(recorded)
        self._recorded(batch, recorded)
        if recorded and self._hooks is not None:
            self._hooks.wake()
        await self._queue_owed(recorded)

    def _report_set_aside(self, failed: tuple[RecipientResult, ...]) -> None:
        """Report the recipients the store set aside in the lease (:attr:`Lease.failed`:
        their rows cannot be read back) like any other final failure: counted, logged,
        handed to ``on_result``, and their outbox events (written with the lease) sent.
        They are recorded already, and are no part of the lease's work. No bounce notice:
        one quotes the message and answers its envelope sender and DSN request, read from
        the work item, and the store hands out none for a recipient it cannot read."""
        for result in failed:
            self._count(result)
        if self._hooks is not None:
            self._hooks.wake()

    def _writing(self, batch: list[RecipientResult], delta: int) -> None:
        """Count ``batch``'s recipients into (1) or out of (-1) the writes under way of
        their leases (see :attr:`_LeaseState.writing`)."""
        leases = self._leases
        for result in batch:
            state = leases.get(result.lease_token)
            if state is not None:
                state.writing += delta

    async def _settle_cut_write(self, timeout: float | None) -> None:
        """What the write the store loop was cancelled in came to, waited for ``timeout``
        seconds at most: its results, once written, are taken in as any write's are
        (suppressions, ``on_result``, notices); put back to be written again when it
        failed or still runs. It goes on in its thread, and a store loop started again
        wrote the same batch beside it: taken over, for all the store could tell."""
        cut = self._cut_write
        if cut is None:
            return
        handed, batch = cut
        if not handed.done():
            # Cancelled here, it stays in _cut_write, for _put_back_cut_write.
            await asyncio.wait({handed}, timeout=timeout)
        self._cut_write = None
        error = handed.exception() if handed.done() and not handed.cancelled() else None
        if isinstance(error, RecordedNotLeased):
            await self._after_record(batch, error.recorded)
        elif not handed.done() or handed.cancelled() or error is not None:
            self._unwritten(batch)
        else:
            recorded, _ = handed.result()  # (no lease: one runs beside a threaded write)
            await self._after_record(batch, recorded)

    def _put_back_cut_write(self) -> None:
        """The batch of a write cut off and never settled, back with what waits to be
        written: counted as unrecorded, and its leases kept (they expire) rather than
        given back. Its outcome is not looked at: one that failed lost nothing; one that
        committed is written again by a later write and read as taken over (no
        on_result for it), where giving its leases back could have sent the mail again."""
        cut, self._cut_write = self._cut_write, None
        if cut is not None:
            self._unwritten(cut[1])

    def _unwritten(self, batch: list[RecipientResult]) -> None:
        """``batch`` was not written: it waits for the next write, first in line."""
        self._writing(batch, -1)
        self._pending[:0] = batch

    def _recorded(self, batch: list[RecipientResult], recorded: list[RecipientResult]) -> None:
        oldest = min(result.attempt.at for result in batch)
        self._counters.record_lag = max(0.0, (self._clock() - oldest).total_seconds())
        ignored = len(batch) - len(recorded)
        for result in batch:
            state = self._leases.get(result.lease_token)
            if state is not None:
                state.unrecorded -= 1
                state.writing -= 1
                state.let_go(result.message_id, 1)
                if state.unrecorded <= 0:
                    state.end()
                    del self._leases[result.lease_token]
        if ignored:
            self.metrics.ignored_results += ignored
            # The lease expired and another worker took these recipients over (or they
            # were cancelled): its outcome stands; the message may have gone out twice.
            log.warning("%d of %d results ignored: taken over or cancelled", ignored, len(batch))
        for result in recorded:
            self._count(result)
            # A retry now due before the due time remembered (read before it was written,
            # and kept while deliveries run) would otherwise wait for the poll.
            retry_at = result.next_attempt_at
            if retry_at is not None and (self._due_at is None or retry_at < self._due_at):
                self._due_at = retry_at

    async def _heartbeat_loop(self) -> None:
        """Keep extending the leases of work still in progress, so that a delivery that
        takes long (slow peers, several MX hosts timing out) is not taken over and sent
        twice by another worker. A worker that dies stops extending, and its leases expire,
        unless a store that can tell it died gives them back sooner (worker_reaping.py)."""
        lease_for = self.config.lease_for
        interval = lease_for.total_seconds() / 3
        loop = asyncio.get_running_loop()
        while True:
            # A timer, or _may_start asking for a beat now.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), interval)
            self._beat_now.clear()
            # This beat asks for every lease: a cancel told from now on needs another.
            with self._cancels_lock:
                checking = self._cancels_checking = self._cancels_unchecked
                self._cancels_unchecked = False
            self._beating = True  # from here on, a check or a call that hangs is fenced
            locked = False
            try:
                await self._check_clock_if_stepped()  # the margin must be the clock's of now
                beat = loop.time()
                until = self._clock_for_leases() + lease_for + lease_margin(self._clock_reading)
                for state in list(self._leases.values()):
                    if locked:
                        # Each would fail as surely, after as long a wait (the whole busy
                        # timeout of a SQLite write lock held elsewhere, on this loop):
                        # left to the next beat, not extended meanwhile (see fencing).
                        state.extend_failed = True
                        continue
                    try:
                        held = await self._store_call(self.store.extend, state.lease, until=until)
                    except StoreError as exc:  # a passing hiccup; the next beat tries again
                        self._store_trouble("extend", exc)
                        state.extend_failed = True
                        locked = isinstance(exc, StoreLocked)
                        continue
                    # The store answers again: while a delivery takes long, no write of
                    # results comes to say so, and the failure stayed in store_error.
                    self._store_fine("extend")
                    state.held_until = beat + lease_for.total_seconds()
                    state.expires_at = until
                    state.extend_failed = state.fenced = False
                    if held < state.unrecorded - state.writing:
                        # The lease expired (this process or the store stalled) and
                        # another worker took some of it over, or messages were
                        # cancelled, held or suspended. (A write under way may have
                        # committed some of it before this worker counted them: those are
                        # not missing.)
                        self._withdraw(state.lease, f"has {held} of {state.unrecorded} left")
                    elif checking and held < state.unrecorded:
                        # Fewer held, no more than a write under way may have committed:
                        # the count cannot tell its results from mail cancelled or held
                        # meanwhile, and this beat is asked for by such a change. Taken
                        # for the write, a cancelled message not yet started went out
                        # after cancel() had returned. Its unstarted work goes back (the
                        # store keeps only what the lease still holds, due at once).
                        self._withdraw(
                            state.lease,
                            f"has {held} of {state.unrecorded} left, "
                            f"{state.writing} being written (perhaps cancelled)",
                        )
            finally:
                self._beating = self._cancels_checking = False
                self._confirmed()

    async def _fence_loop(self) -> None:
        """Fencing: a lease whose last confirmed extension is running out (the store could
        not be reached, or each beat's calls took too long) may be taken over by another
        worker whose clock is ahead, by less than the skew that stops it leasing, before
        this one can extend it again. Its work not yet started then waits for the store
        instead of going out, where it could go out twice. Judged apart from the
        heartbeat, so that a store call that hangs does not delay it; only while the
        heartbeat is failing or under way (a heartbeat merely late on a busy loop is no
        sign that the store is out of reach). Every lease is fenced so while the worker
        is cut off from a store whose other workers may take it for dead
        (worker_reaping.py), which comes much sooner on PostgreSQL (``dead_after``)."""
        lease_for = self.config.lease_for
        check = lease_for.total_seconds() / 12
        # A healthy lease is extended every lease_for / 3, to lease_for from the beat: it
        # never comes this close to expiring.
        early = danger_skew(lease_for) + check
        dead_after = self._dead_after
        if dead_after is not None:
            check = min(check, dead_after / 16)  # see _cut_off_now
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(check)  # a timer, not synchronisation
            now = loop.time()
            cut_off = self._cut_off_now(now)
            for state in list(self._leases.values()):
                if state.fenced:
                    continue
                if cut_off:
                    self._fence(state, _CUT_OFF)
                elif now >= state.held_until - early and (state.extend_failed or self._beating):
                    self._fence(state, "could not be extended in time")
            self._confirmed()  # sessions waiting in _may_start ask again

    def _may_start(self, token: str) -> bool | asyncio.Future[None]:
        """Whether work of the lease ``token`` may start a transaction now: not once the
        lease has outlived the last extension the store confirmed (by the loop's clock,
        or by the worker's own clock, which alone goes on while the host is suspended),
        nor once this worker's last beat is older than the store's ``dead_after``
        (worker_reaping.py), when another worker may have taken the lease over. Both
        happen when this worker stalls (its process stopped, its loop blocked, its host
        suspended): when it resumes, a session that reads the replies that came meanwhile
        would start the next transaction before the heartbeat or the next look (timers,
        run after them) could tell. The lease's unstarted work
        is then given back, as fencing does; a later extension lets the rest go on.

        Within ``danger_skew`` of that end, a worker whose clock is ahead by less than the
        skew that stops it leasing may have taken the lease over already. A healthy lease
        never comes that close (each beat extends it to ``lease_for``), but a beat late on
        a busy loop does as surely as a stall: so the answer is then a future, done after
        a beat asked for at once (or the fencing's next look), and the session asks again.
        Giving the work back instead would send a busy worker's leases round the store
        while they were still its own."""
        state = self._leases.get(token)
        if state is None or state.fenced:
            return True
        now = asyncio.get_running_loop().time()
        if now >= state.held_until:
            self._fence(state, "outlived its last extension (this worker stalled)")
            return False
        wall = self._clock()
        if wall >= state.expires_at:
            # The loop's clock stood still while the wall clock went on: the host was
            # suspended (or the clock stepped), and other workers see the lease expired.
            self._fence(state, "expired by the clock (this host was suspended)")
            return False
        if self._may_be_taken_for_dead(now, wall):
            self._fence(state, "may be given back: this worker was not seen for dead_after")
            return False
        if self._cancels_unchecked or self._cancels_checking:
            # Mail was cancelled, held or suspended, perhaps of this lease: not started
            # before the store has said what the lease still holds (see check_leases), in
            # a beat asked for now unless one asks already.
            return self._confirmation(beat=self._cancels_unchecked)
        if state.screened_at is not None and wall - state.screened_at >= RESCREEN_AFTER:
            # Its work waited (for a connection, a rate, a lane): an entry added to the
            # suppression list meanwhile applies to it too, as the guide promises.
            return self._screen_again(state)
        if now < state.held_until - danger_skew(self.config.lease_for):
            return True
        return self._confirmation()

    def _confirmation(self, *, beat: bool = True) -> asyncio.Future[None]:
        """A beat asked for at once (with ``beat``), and a future done once the beat (or
        the fencing's next look) has ended: :meth:`_may_start`'s "ask again then"."""
        if beat:
            self._beat_now.set()
        if self._confirming is None:
            self._confirming = asyncio.get_running_loop().create_future()
        return self._confirming

    def _confirmed(self) -> None:
        """Let the sessions waiting for a lease's confirmation (_may_start) ask again."""
        if self._confirming is not None:
            if not self._confirming.done():
                self._confirming.set_result(None)
            self._confirming = None

    def _fence(self, state: _LeaseState, why: str) -> None:
        """Give back the unstarted work of a lease that may be taken over (``why``), once:
        until an extension confirms it again."""
        state.fenced = True
        self._withdraw(state.lease, why)

    def _withdraw(self, lease: Lease, why: str) -> None:
        """Give the work of ``lease`` that no session has started back to the store, which
        gives back only what the lease still holds (due at once): another worker took the
        lease over, or may (``why`` says which). Deliveries already under way go on (their
        results are ignored if taken over); one whose connection breaks is given back
        too, not tried again."""
        if self._dispatcher is None:
            return
        given = self._dispatcher.withdraw(lease.token)
        if given:
            log.warning(
                "lease %s %s: %d recipients not yet started given back", lease.token, why, given
            )
