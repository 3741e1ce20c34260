"""From work items to SMTP sessions: a queue per destination, a few sessions each.

A destination is a recipient domain (or the relay, when one is configured). Its work items
wait in one queue — its mail that asks for REQUIRETLS, or carries ``TLS-Required: No``, in
one of its own, as such mail may need other connections (and TLS reports in another, since
their sessions are not counted for the next report) — and up to
``max_per_destination`` session tasks over all its queues (``max_connections`` over all
destinations) take them in turn: a server counts a client's connections whatever TLS
they carry. A session resolves the route, connects to the first address that answers
(RFC 5321 §5.1: MX hosts in preference order, every address of each) and streams
transactions over that connection, keeping three submitted so that one is on the wire
while another is answered. A session does not hold anything but its own
connection: a stalled server ties up its own sessions only, never the other destinations.
Nor do the domains of one MX host together: at most ``max_per_destination`` connections
are being opened to one address at once, and a destination that finds that many waits
for one of them to end without a session (:meth:`Dispatcher._park_at`).
``max_connections`` bounds the sockets as well as the sessions — idle and closing ones
count, and a session at the limit waits for a slot while idle connections are closed to
make room: see :mod:`mailstrom.runtime.opener` for the rule.

Failures follow the delivery rules: a connection that cannot be made, or a refused greeting
(or a 421 to MAIL, RCPT, DATA or the final dot before the connection took a message),
moves on to the next address; a connection that breaks before a transaction's final dot
puts that item back for the next address, at most ``Config.mx_session_limit`` sessions
per item (as Postfix's ``smtp_mx_session_limit``); once every address was tried the items
left are deferred with the last error (the last reply a server gave against the mail or
a new connection, not a later address that could not be reached and so said nothing) —
unless other sessions of the destination are still connected, in which case the
destination just runs with fewer sessions until mail goes again (Postfix's concurrency
feedback). What a session never sent, as it broke on a transaction ahead (a stall at one
recipient's RCPT), was not tried: it goes back to the store due at once, no attempt
counted, not deferred with that transaction's failure.
An address that could not be reached goes after the others for a while
(:mod:`mailstrom.runtime.unreachable`); a connection this host had no socket for
(:class:`~mailstrom.errors.LocalResourceShortage`) is held against no address: the queue is
deferred with it at once, as every other address would fail the same way, no attempt
counted; but an item the destination had already failed in that round (an address that
refused it, a session that broke on it) is deferred with that failure, an attempt counted.

Traffic shaping (``runtime.shaper``) hooks in at four points: a destination whose rule
allows fewer connections runs fewer sessions (and one whose slots are all taken by other
domains of the same rule waits, parked, without holding a session); a new connection waits
for the connection rate; each message waits for the message rate; and a throttling reply
pauses the destination: its queue is given back to the store due at the end of the pause
(``on_postpone``), as is every item that arrives for it while the pause lasts. As the
worker stops (:meth:`Dispatcher.drain`), what is queued for a rate goes back to the store,
each message due at its place in the rate's schedule: it is not in flight, and the stop
waits for no rate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from mailstrom.config import Config
from mailstrom.errors import (
    DeliveryError,
    LocalResourceShortage,
    PermanentFailure,
    RequireTLSFailure,
    SMTPConnectError,
    SMTPTimeout,
    TemporaryFailure,
    TLSRequiredError,
    local_shortage,
)
from mailstrom.policy.throttle import is_throttling
from mailstrom.routing import MXHost, Route, Router
from mailstrom.runtime.connection import ServiceClosing, SMTPConnection, TLSHandshakeError
from mailstrom.runtime.opener import Opener
from mailstrom.runtime.outcomes import (
    Outcomes,
    Where,
    at_connection_limit,
    over_recipient_limit,
    recipients_taken,
    refused_before_cut,
)
from mailstrom.runtime.shaper import Shape, Shaper
from mailstrom.runtime.socket_budget import SocketBudget
from mailstrom.runtime.transactions import (
    EnvelopeCut,
    Outcome,
    TransactionResult,
    Withdrawn,
    answered_before,
    failure,
    was_written,
)
from mailstrom.runtime.unreachable import UnreachableAddresses
from mailstrom.smtp import encode_path
from mailstrom.status import DestinationThrottle, DKIMStatus, RecipientState, SMTPReply
from mailstrom.stores.base import RecipientResult, WorkItem
from mailstrom.tls.decide import Destination, TLSDecider
from mailstrom.tls.headers import tls_report, tls_required_no
from mailstrom.tls.requirement import TLSRequirement

if TYPE_CHECKING:
    from mailstrom.dkim.config import DKIMConfig
    from mailstrom.dkim.resigned import ResignedMessages

log = logging.getLogger("mailstrom.delivery")

_DEPTH = 3
"""Transactions kept submitted per connection: one being answered, the next on the wire,
and one more waiting, so that the content of the next leaves with the envelope after it
even when the replies of both arrive in one segment."""


def lease_share(config: Config, high_water: int) -> int | None:
    """The most recipients of one destination a worker's lease takes (``high_water`` the
    most it holds in flight): a quarter of that, and at least enough to keep the
    destination's connections busy twice over (:data:`_DEPTH` transactions each), so
    that one destination's backlog does not fill the worker, while a backlog within a
    quarter of it is leased whole (its mail asking for REQUIRETLS, or a password reset
    queued after it, has its own queue here and need not wait for its turn in the
    store). None (no bound) with a relay, the one destination."""
    if config.relay is not None:
        return None
    return max(config.max_per_destination * _DEPTH * 2, high_water // 4)


Done = Callable[[list[RecipientResult]], None]
Postpone = Callable[[list[WorkItem], datetime, str | None], None]
"""Give items back to the store, due at a time, naming the paused destination (or None)."""
MayStart = Callable[[str], "bool | asyncio.Future[None]"]
"""Whether work of the lease with this token may start a transaction now; before it says
no, it gives that lease's unstarted work back (:meth:`Dispatcher.withdraw`). A future
means not yet: the lease is being confirmed, ask again once the future is done."""
TLSObserver = Callable[[str, TLSRequirement, str, str, DeliveryError | SMTPConnection], None]
"""Told (domain, requirement, MX host, address, the error or the opened connection) after
each connection attempt, for TLS reports (``observe_tls``)."""


@dataclass(slots=True, eq=False)
class _Work:
    """One work item on its way (private, mutable)."""

    item: WorkItem
    started: float = 0.0
    broken_sessions: int = 0
    seven_bit: bytes | None = None  # the 7-bit downgrade, made at most once
    seven_bit_dkim: DKIMStatus | None = None
    """The signatures of ``seven_bit`` when the worker signed it anew (None: those of
    ``item.data``). Kept apart: the same work may go 8-bit on another connection next."""
    dkim: DKIMStatus | None = None
    """The signatures of ``item.data`` when the worker signed it anew (None: as queued);
    ``item.dkim`` is set at each submit to those of the bytes sent."""
    queued: bytes | None = None
    """``item.data`` as leased, once the worker signed it anew: a later submit signs
    from these, as :class:`ResignedMessages` expects, not from the bytes it made, whose
    layout no longer tells ours kept (their older ``t=``) from the application's."""
    ours: int | None = None
    """Octets of our signature fields on top of ``item.data`` once the worker signed it
    anew (None: as queued, told by their layout; see resign_stale_top)."""
    rank: int = 0  # the item's lane, 0 the highest (see Dispatcher._rank)
    unsent: DeliveryError | None = None
    """What broke the last session it waited on with none of its commands on the wire,
    behind a transaction that was (None once a session wrote them): it was not tried, and
    goes back untried rather than be deferred with another's failure (see _give_up)."""
    met: tuple[DeliveryError, Where] | None = None
    """The last failure the destination gave it (a host that refused or could not be
    reached while it waited, a session that broke on it), and where: a round that this
    host's own shortage ends (:class:`~mailstrom.errors.LocalResourceShortage`) defers it
    with that, an attempt counted, not as though no server had been asked (see
    _fail_queue)."""


@dataclass(slots=True, eq=False)
class _Lane:
    """The lane a session counts against (private, mutable): the one of the work it was
    started for, and a lower one from when it carries that lane's work."""

    rank: int


@dataclass(slots=True, eq=False)
class _Sessions:
    """The sessions of one destination over all its queues (private, mutable):
    ``max_per_destination`` bounds them together."""

    running: int = 0
    held: deque[_Destination] = field(default_factory=deque)
    """Its queues that wanted a session while the bound was reached, in turn."""


@dataclass(slots=True, eq=False)
class _Destination:
    """One queue of a destination, and the sessions taking from it."""

    key: str
    domain: str
    limit: int
    queue: deque[_Work]
    shared: _Sessions
    """The destination's sessions, which its other queues count against too."""
    sessions: int = 0
    connected: int = 0
    waiting: bool = False
    held: bool = False
    """In ``shared.held``: the destination's other queues have all its sessions."""
    parked: bool = False
    """Waiting for a connection slot of its shaping rule (shared with other domains), or
    for a connection being opened to an address to end (see Dispatcher._opening)."""
    connect_tokens: int = 0
    """Connection-rate tokens its sessions took for connections they then did not open
    (the address reached its opening cap while they waited for the rate, see
    :meth:`Dispatcher._may_connect`): its next connections use them before taking more."""
    woken_by: Shape | None = None
    """The shape whose free slot :meth:`Dispatcher._unpark` started it for, until its
    next session begins: that session passes the slot on if it does not take it."""
    require_tls: bool = False
    """Its messages ask for REQUIRETLS (they get a queue of their own)."""
    tls_optional: bool = False
    """Its messages carry ``TLS-Required: No`` (they get a queue of their own)."""
    tls_report: bool = False
    """Its messages are TLS reports (also ``tls_optional``; a queue of their own): RFC
    8460 §3 leaves a report's own session out of the next report, so its connections are
    not told to ``observe_tls``."""
    moved: float = field(default_factory=time.monotonic)
    """When a session last took work from the queue (or the queue was made): a queue that
    has not moved for long waits behind a server that does not (see :meth:`Dispatcher.relieve`)."""
    recipient_limit: int | None = None
    """The fewest recipients one of its servers took in a transaction before it refused
    the rest for its limit (RFC 5321 §4.5.3.1.10), once one did: no transaction names more
    (see :meth:`Dispatcher._stream`). Kept while the queue lives."""


@dataclass(slots=True)
class _Took:
    """Whether a connection took a message (a reply to its content came), as
    :meth:`Dispatcher._stream` goes (private, mutable)."""

    answered: bool = False


_InFlight = deque[tuple[_Work, "asyncio.Future[TransactionResult]"]]
"""Transactions submitted on a connection, oldest first, with what each will come to."""

_REQUIRE_TLS = "\0requiretls"
_TLS_OPTIONAL = "\0tls-optional"
_TLS_REPORT = "\0tls-report"
"""Suffixes of the queue keys of a destination's mail that changes the TLS decision."""


class Dispatcher:
    """Delivers work items; reports each item's results through ``on_done``."""

    def __init__(
        self,
        config: Config,
        *,
        router: Router,
        outcomes: Outcomes,
        on_done: Done,
        shaper: Shaper | None = None,
        on_postpone: Postpone | None = None,
        tls: TLSDecider | None = None,
        observe_tls: TLSObserver | None = None,
        may_start: MayStart | None = None,
    ) -> None:
        """``tls`` decides each connection's TLS requirement (default: the one ``config``
        asks for, without a store to share remembered broken TLS). ``may_start`` is asked
        before each transaction whether its lease still holds (default: always)."""
        self._config = config
        self._shaper = shaper
        self._on_postpone = on_postpone
        self._may_start = may_start
        self._spread: dict[datetime, list[WorkItem]] = {}
        self._lost: set[str] = set()
        """Withdrawn leases with work still here (on the wire): a session that breaks, or
        a server's recipient limit, gives that work back instead of queueing it again.
        Each is forgotten once nothing of it is left (see _held), not after a count of
        newer ones: a worker cut off from its store withdraws every lease it holds at
        once, and a forgotten one's work went out twice."""
        self._held: dict[str, int] = {}
        """Recipients handed to :meth:`submit` per lease token, not yet reported or given
        back."""
        self._on_wire: dict[SMTPConnection, _InFlight] = {}
        """The transactions submitted on each connection a session sends on, for
        :meth:`withdraw` to take back those whose content has not gone."""
        self._router = router
        self._outcomes = outcomes
        self._on_done = on_done
        self._tls = tls if tls is not None else TLSDecider.for_config(config)
        self._observe_tls = observe_tls
        self._opener = Opener(config, on_tls_broken=self._tls.broken.note)
        self._unreachable = UnreachableAddresses(config.remember_unreachable.total_seconds())
        source = config.source_address
        self._source_family = None if source is None else ipaddress.ip_address(source).version
        """The IP version of ``source_address``: addresses of the other cannot be reached."""
        self._destinations: dict[str, _Destination] = {}
        self._waiting: deque[_Destination] = deque()
        self._opening: dict[str, int] = {}
        """Connections being opened (connect, greeting, EHLO, STARTTLS) per address: at
        most ``max_per_destination`` over all destinations. Many domains share one MX
        host; without the bound one that accepts and never greets took a session of each
        until all ``max_connections`` waited for its greeting, and every other
        destination's mail with them."""
        self._parked_at: dict[str, deque[_Destination]] = {}
        """Destinations waiting for a connection being opened to an address to end."""
        self._sessions = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        """Set by :meth:`close`: no session starts from then on."""
        self.hold_cancels = False
        """Set, for its whole life, by a worker that may outlive a cancel nobody meant as
        its end (a worker task, which asyncio.run ending cancels with every other task):
        a session awaiting a transaction's reply is cancelled by a cancel other than
        :meth:`close`'s only once that reply is in (bounded by the worker's drain, whose
        :meth:`close` cancels it for good), the server's acceptance recorded, not lost.
        On from the start, not from the worker's cancel: that sweep cancels the tasks in
        no set order, the sessions often before the worker's."""
        self._draining = False
        """Set by :meth:`drain`: no work waits for a destination's rate from then on."""
        self._resigned: ResignedMessages | None = None
        """The messages this worker signed anew as it sent them, made at first need."""
        self._relay_route: Route | None = None
        if config.relay is not None:
            host = MXHost(name=config.relay.host, preference=0, addresses=(config.relay.host,))
            self._relay_route = Route(domain=config.relay.host, hosts=(host,), implicit=False)
        self._ranks = {lane.name: i for i, lane in enumerate(config.lanes)}
        # Sessions each lane may start: its share of max_connections. Work of a lane not
        # configured (queued before lanes existed) ranks lowest but is not held to a share.
        caps = [max(1, int(lane.share * config.max_connections)) for lane in config.lanes]
        self._lane_caps = [*caps, config.max_connections]
        self._lane_sessions = [0] * len(self._lane_caps)
        self.in_flight = 0
        """Recipients handed to :meth:`submit` whose results have not been reported."""
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def sessions(self) -> int:
        """SMTP sessions running (connecting, sending or waiting for a reply)."""
        return self._sessions

    @property
    def idle_connections(self) -> int:
        """Connections kept open for reuse (no session runs on them)."""
        return self._opener.idle_count

    # --- taking work -------------------------------------------------------------------

    def submit(self, item: WorkItem) -> None:
        """Deliver ``item`` (results arrive through ``on_done``)."""
        self.in_flight += len(item.recipients)
        self._held[item.lease_token] = self._held.get(item.lease_token, 0) + len(item.recipients)
        self.idle.clear()
        if item.expires_at is not None and self._outcomes.is_expired(item):
            self._done(self._outcomes.expired(item))
            return
        work = _Work(item=item)
        checked = self._check_paths(work)
        if checked is None:
            return
        checked.rank = self._ranks.get(item.priority, len(self._ranks))
        key = self._config.relay.host if self._config.relay is not None else item.domain
        shaping_key = key  # before the TLS split below: one destination for shaping
        shape: Shape | None = None
        if self._shaper is not None:
            shape = self._shaper.known(shaping_key)
            pause = self._shaper.pause_of(shape) if shape is not None else None
            if pause is not None:
                self._postpone([checked], pause)  # paused: back to the store at once
                return
            if shape is not None and shape.message_buckets:
                ahead = _queued(shape, checked.rank)
                max_age = self._config.retry.max_age
                latest = None if max_age is None else _first_due(checked.item) + max_age
                later = self._shaper.spread(shape, ahead, checked.rank, latest=latest)
                if later is not None:
                    self._postpone_later(checked, later)  # the rate would keep it waiting
                    return
        # Messages that change the TLS decision (RFC 8689) travel apart from the others.
        require_tls = checked.item.require_tls
        tls_optional = not require_tls and tls_required_no(checked.item.data)
        report = tls_optional and tls_report(checked.item.data)
        if require_tls:
            key += _REQUIRE_TLS
        elif report:
            key += _TLS_REPORT
        elif tls_optional:
            key += _TLS_OPTIONAL
        dest = self._destinations.get(key)
        if dest is None:
            dest = self._destinations[key] = _Destination(
                key=key,
                domain=item.domain,
                limit=self._config.max_per_destination,
                queue=deque(),
                shared=self._sessions_of(shaping_key),
                require_tls=require_tls,
                tls_optional=tls_optional,
                tls_report=report,
            )
        if shape is not None and shape.message_buckets:
            shape.queues[key] = dest.queue
        _enqueue_by_rank(dest.queue, checked)
        self._start_sessions(dest)

    def _sessions_of(self, destination: str) -> _Sessions:
        """The session count of ``destination`` (a domain, or the relay), shared by its
        queues: a queue with sessions running is never forgotten, so the count is found
        through any of them."""
        for suffix in ("", _REQUIRE_TLS, _TLS_OPTIONAL, _TLS_REPORT):
            key = destination + suffix
            dest = self._destinations.get(key)
            if dest is not None:
                return dest.shared
        return _Sessions()

    def _check_paths(self, work: _Work) -> _Work | None:
        """Fail, alone and for good, each recipient SMTP cannot carry (hardening #5): one
        bad address must not hold up the others of its domain. None when nothing is left."""
        item = work.item
        try:
            encode_path(item.envelope_from, item.smtputf8)
        except ValueError as exc:
            error = PermanentFailure(f"the envelope sender cannot be sent: {exc}", enhanced="5.1.7")
            self._done(self._outcomes.from_error(item, error, time.monotonic(), Where()))
            return None
        bad = []
        for recipient in item.recipients:
            try:
                encode_path(recipient.address, item.smtputf8)
            except ValueError as exc:
                bad.append((recipient, str(exc)))
        if not bad:
            return work
        for recipient, reason in bad:
            error = PermanentFailure(
                f"the recipient address cannot be sent: {reason}", enhanced="5.1.3"
            )
            self._done(
                self._outcomes.from_error(
                    item, error, time.monotonic(), Where(), recipients=[recipient]
                )
            )
        refused = {r for r, _ in bad}
        rest = tuple(r for r in item.recipients if r not in refused)
        if not rest:
            return None
        return _Work(item=replace(item, recipients=rest))

    def _start_sessions(self, dest: _Destination) -> None:
        if dest.parked or self._closing:
            return  # parked: started again when its shaping rule frees a connection slot
        max_connections = self._config.max_connections
        shared = dest.shared
        while (
            dest.queue
            and dest.sessions < dest.limit
            and (dest.sessions == 0 or len(dest.queue) > dest.sessions * _DEPTH)
        ):
            if shared.running >= self._config.max_per_destination:
                # The destination's other queues have its sessions: started when one ends.
                if not dest.held:
                    dest.held = True
                    shared.held.append(dest)
                return
            # A session counts against the lane of the work at the head of the queue
            # (the highest lane waiting there): a lane past its share waits for one of
            # its own sessions to end, while higher lanes still get connections.
            rank = dest.queue[0].rank
            if (
                self._sessions >= max_connections
                or self._lane_sessions[rank] >= self._lane_caps[rank]
            ):
                if not dest.waiting:
                    dest.waiting = True
                    self._waiting.append(dest)
                return
            dest.sessions += 1
            shared.running += 1
            self._sessions += 1
            self._lane_sessions[rank] += 1
            task = asyncio.get_running_loop().create_task(self._session(dest, rank))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _done(self, results: list[RecipientResult]) -> None:
        self.in_flight -= len(results)
        if self.in_flight <= 0:
            self.idle.set()
        if results:  # all of one item, so of one lease
            self._let_go(results[0].lease_token, len(results))
        self._on_done(results)

    def _let_go(self, lease_token: str, count: int) -> None:
        """``count`` recipients of the lease ``lease_token`` are out of this dispatcher."""
        left = self._held.get(lease_token, 0) - count
        if left > 0:
            self._held[lease_token] = left
        else:
            self._held.pop(lease_token, None)
            self._lost.discard(lease_token)  # nothing of it is left to give back

    # --- one session -------------------------------------------------------------------

    async def _session(self, dest: _Destination, rank: int) -> None:
        lane = _Lane(rank)
        # Woken for a free slot of its rule, alone (see _unpark): a session that does not
        # take it (no route, the rule paused) must wake the next parked destination, or
        # that one waits, its mail leased, until some other session of the rule ends.
        woken_by, dest.woken_by = dest.woken_by, None
        try:
            await self._run(dest, lane)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug must neither leave the items leased forever nor lose them: they are
            # deferred, so the retry policy (and its maximum age) still applies.
            log.exception("delivery to %s crashed", dest.domain)
            error = TemporaryFailure(f"internal error: {type(exc).__name__}: {exc}")
            self._fail_queue(dest, error, Where())
        finally:
            dest.sessions -= 1
            dest.shared.running -= 1
            self._sessions -= 1
            self._lane_sessions[lane.rank] -= 1
            self._start_held(dest.shared)
            if dest.queue:
                self._start_sessions(dest)
            elif dest.sessions == 0 and self._destinations.get(dest.key) is dest:
                del self._destinations[dest.key]
            if woken_by is not None:
                self._unpark(woken_by)  # nothing to do if the slot was taken and is held
            self._start_waiting()

    def _start_held(self, shared: _Sessions) -> None:
        """Give the destination's free sessions to its queues held back for them, in
        turn (one session of the queue that just had one could keep the others waiting
        while its own mail keeps coming)."""
        held = shared.held
        while held and shared.running < self._config.max_per_destination:
            dest = held.popleft()
            dest.held = False
            if dest.queue:
                self._start_sessions(dest)
            else:
                self._pass_on(dest)

    def _start_waiting(self) -> None:
        """Give free connections to waiting destinations, highest lane first; one whose
        lane is past its share goes on waiting."""
        if not self._waiting or self._sessions >= self._config.max_connections:
            return
        waiting = sorted(self._waiting, key=lambda d: d.queue[0].rank if d.queue else 0)
        self._waiting.clear()
        for dest in waiting:
            dest.waiting = False
            if dest.queue:
                self._start_sessions(dest)
            else:
                self._pass_on(dest)

    def _pass_on(self, dest: _Destination) -> None:
        """``dest``, its turn come, has nothing left to start a session for (its work was
        withdrawn, screened out or relieved while it waited): a free slot of its shaping
        rule it was woken for (see :meth:`_unpark`) goes to the next parked destination,
        or that one waits, its mail leased, until some other session of the rule ends."""
        woken_by = dest.woken_by
        if woken_by is not None:
            dest.woken_by = None
            self._unpark(woken_by)

    @staticmethod
    def _others_wait(dest: _Destination) -> bool:
        """Whether another queue of ``dest``'s destination waits for one of its sessions:
        a session then ends once its connection is done (at most
        ``max_messages_per_connection`` messages), rather than carry a backlog to its end
        while a REQUIRETLS password reset waits behind it."""
        return any(other.queue for other in dest.shared.held if other is not dest)

    async def _route(self, dest: _Destination) -> Route:
        if self._relay_route is not None:
            return self._relay_route
        route = self._router.cached(dest.domain)  # no coroutine while the route is known
        if route is None:
            route = await self._router.route(dest.domain)
        return route

    def _may_carry(self, work: _Work, lane: _Lane) -> bool:
        """Whether a session counted against ``lane`` may take ``work``. Work of a lower
        lane moves the session to that lane, if the lane has a session to spare: a
        session started for a password reset must not carry on with a bulk backlog past
        bulk's share, keeping every other domain's transactional mail waiting."""
        if work.rank <= lane.rank:
            return True
        if self._lane_sessions[work.rank] >= self._lane_caps[work.rank]:
            return False
        self._lane_sessions[lane.rank] -= 1
        self._lane_sessions[work.rank] += 1
        lane.rank = work.rank
        self._start_waiting()  # the lane it left may have room for one waiting
        return True

    async def _run(self, dest: _Destination, lane: _Lane) -> None:
        try:
            route = await self._route(dest)
        except DeliveryError as exc:
            # A DNS server failing (SERVFAIL, a timeout) while another session of the
            # destination is at it, its route still good: that one carries the queue, as
            # after a connection that cannot be made (see _deliver). Alone, the session
            # defers the queue, as Postfix defers a nexthop it cannot look up.
            if isinstance(exc, TemporaryFailure) and self._leave_to_others(dest):
                return
            self._fail_queue(dest, exc, Where(host=exc.host))
            return
        if self._shaper is None:
            await self._deliver(dest, route, None, lane)
            return
        shape = self._shaper.for_route(self._shaped_name(dest), _preferred(route))
        if shape.message_buckets:
            shape.queues[dest.key] = dest.queue  # a rule found through the MX hosts
        if self._held_back(dest, shape):
            return
        limit = shape.max_connections
        if limit is not None:
            dest.limit = min(dest.limit, limit)
            if not shape.has_slot():
                # Other domains of this rule hold every slot: wait without a session.
                dest.parked = True
                shape.parked.append(dest)
                return
        shape.connections += 1
        try:
            await self._deliver(dest, route, shape, lane)
        finally:
            shape.connections -= 1
            self._unpark(shape)

    def _shaped_name(self, dest: _Destination) -> str:
        """The name ``dest`` is shaped by: its domain, or the relay's."""
        return self._relay_route.domain if self._relay_route is not None else dest.domain

    def _heeds(self, shape: Shape, dest: _Destination, host: str | None) -> bool:
        """Whether a throttling reply of ``host`` pauses ``shape`` (see Shape.heeds)."""
        return shape.heeds(self._shaped_name(dest), host)

    async def _deliver(
        self, dest: _Destination, route: Route, shape: Shape | None, lane: _Lane
    ) -> None:
        targets = [(host, ip) for host in route.hosts for ip in host.addresses]
        unreachable = self._unreachable
        last_error: DeliveryError = TemporaryFailure(
            "no MX host could be reached",
            enhanced="4.4.4",  # RFC 3463: unable to route
            host=route.hosts[0].name if route.hosts else None,
        )
        family = self._source_family
        if family is not None:
            # A socket bound to source_address cannot reach an address of the other IP
            # version: skipped, as an MTA limited to one protocol never looks them up.
            # Tried, its error ("no matching local address") was the recipients' reason
            # in place of what a server had said, and it was remembered as unreachable.
            targets = [t for t in targets if _of_family(t[1], family)]
            if not targets:
                last_error = TemporaryFailure(
                    f"no MX host of {dest.domain} has an IPv{family} address, which "
                    f"source_address {self._config.source_address} needs",
                    enhanced="4.4.4",
                    host=last_error.host,
                )
        unreachable.demote(targets)
        # Where the attempt that ended in last_error went, for the recipients' history.
        last_where = Where(host=last_error.host)
        # The last failure that says nothing about REQUIRETLS (a host not reached, a
        # session that broke...): such a host may offer it (RFC 8689 §4.2.1).
        unasked: tuple[DeliveryError, Where] | None = None
        # The last reply a server gave against this mail or this connection attempt (a
        # 554 or 451 greeting, a 421 to a new connection's first MAIL): a host that then
        # could not be reached said nothing, and does not replace it, whatever came
        # between. Not a 421 that ended a connection after it took mail (its limit of
        # messages per connection), nor one to a reused idle connection.
        replied: tuple[DeliveryError, Where] | None = None
        index = 0
        opener = self._opener
        # The rule's own bound on sockets, besides the worker's (see runtime.opener).
        budget = shape.sockets if shape is not None else None
        # Addresses that could not be reached in this attempt: another MX host name of the
        # same machine would cost the same timeout again (a name matters only to TLS).
        unreached: set[str] = set()
        while dest.queue and index < len(targets):
            if targets[index][1] in unreached:
                index += 1
                continue
            if not self._may_carry(dest.queue[0], lane):
                return  # the session's end lets the queue wait for a session of its lane
            if shape is not None and not await self._may_go_on(dest, shape):
                return
            mx, ip = targets[index]
            host = mx.name
            try:
                need = await self._tls.requirement(self._destination(dest, route, mx))
            except DeliveryError as exc:
                # This host must not be used now (TLSA lookup failed, a policy refuses it).
                exc.host = exc.host or host
                last_error = exc
                last_where = Where(host=exc.host)  # no connection was made
                if isinstance(exc, LocalResourceShortage):
                    # No descriptor for the lookup or the policy fetch: this host's, and
                    # the next MX host would look up and fail again (as a connection
                    # short of a socket below). Nothing is held against the queue.
                    break
                _meet(dest.queue, exc, last_where)
                if not isinstance(exc, RequireTLSFailure):
                    unasked = (last_error, last_where)
                index += 1
                continue
            key = opener.key(host, ip, need, budget=budget)
            conn = opener.idle(key)
            if conn is None and need.dane_next_hops:
                # One whose DANE-TA certificate named only this recipient domain (or its
                # CNAME expansion).
                key = opener.key(host, ip, need, via_next_hop=True, budget=budget)
                conn = opener.idle(key)
            reused = conn is not None
            if conn is None:
                try:
                    opening_cap = self._config.max_per_destination
                    if self._opening.get(ip, 0) >= opening_cap:
                        # Other destinations' sessions wait for this address to greet
                        # (one MX host of many domains): wait for one of them to end
                        # without a session, which other destinations may use meanwhile.
                        # Before the connection rate: a token is a connection made.
                        self._park_at(dest, ip)
                        return
                    if shape is not None and not await self._may_connect(dest, shape):
                        return
                    if self._opening.get(ip, 0) >= opening_cap:
                        # Reached while it waited for the rate: the token it took is
                        # kept for the connection it makes once woken.
                        if shape is not None:
                            dest.connect_tokens += 1
                        self._park_at(dest, ip)
                        return
                    self._opening[ip] = self._opening.get(ip, 0) + 1
                    try:
                        conn, need = await self._open(dest, host, ip, need, budget)
                    finally:
                        self._opened(ip)
                    key = opener.key(
                        host, ip, need, via_next_hop=conn.dane_via_next_hop, budget=budget
                    )
                    unreachable.clear(ip)
                except DeliveryError as exc:
                    exc.host = exc.host or host
                    if isinstance(exc, LocalResourceShortage):
                        # This host's trouble (no socket to be had), not the address's:
                        # nothing is remembered against it, and the other addresses would
                        # fail the same way.
                        last_error, last_where = exc, Where(exc.host, ip, opener.port)
                        break
                    if isinstance(exc, SMTPConnectError | SMTPTimeout):
                        # No session at all (no reply to go by): the next sessions try
                        # this address after the others (runtime.unreachable).
                        unreachable.note(ip)
                        unreachable.demote(targets, index + 1)
                        unreached.add(ip)
                    if isinstance(exc, TLSHandshakeError | TLSRequiredError) and need.reason:
                        # Say which policy refused, not just what the peer did.
                        exc.text = f"{exc.text} (TLS policy {need.label}: {need.reason})"
                    where = Where(exc.host, ip, opener.port, tls_policy=need.label)
                    if exc.reply is not None:
                        replied = (exc, where)
                    if isinstance(exc, SMTPConnectError | SMTPTimeout) and replied:
                        # A host that could not be reached said nothing about this mail:
                        # a reply an earlier host gave (a 554 greeting naming a block
                        # list, a 451) stays the reason, not a backup's "refused".
                        last_error, last_where = replied
                    else:
                        last_error, last_where = exc, where
                    unasked = (last_error, last_where)
                    _meet(dest.queue, exc, where)
                    if shape is not None and await self._throttled_connecting(
                        dest, shape, exc, where
                    ):
                        return
                    index += 1
                    continue
            if dest.require_tls and "REQUIRETLS" not in conn.extensions:
                # RFC 8689 §4.2.1: this host cannot take these messages; another MX host
                # may. They fail (5.7.30) only when none can.
                last_error = RequireTLSFailure(
                    f"message requires TLS (REQUIRETLS), which {host} does not support",
                    code=550,
                    enhanced="5.7.30",
                    host=host,
                )
                last_where = Where.of(conn, need)
                _meet(dest.queue, last_error, last_where)
                opener.release(key, conn)  # sound, and of use to other mail
                index += 1
                continue
            dest.connected += 1
            inflight: _InFlight = deque()
            retry: list[_Work] = []
            took = _Took()
            self._on_wire[conn] = inflight
            try:
                broke, answered = await self._stream(
                    dest, conn, reused, need, lane, inflight, retry, shape, took
                )
            except BaseException as exc:
                # Cancelled (the worker stops with this delivery in flight): the socket
                # must not outlive the session, nor its timers fire into nobody.
                opener.abandon(conn)
                left = self._report_cut_off(
                    inflight, Where.of(conn, need), reused=reused or took.answered
                )
                if not isinstance(exc, asyncio.CancelledError):
                    # A bug: what it left without a result is deferred with the queue
                    # (see _session), not left leased for as long as the worker runs.
                    dest.queue.extendleft(reversed(retry + left))
                raise
            finally:
                dest.connected -= 1
                del self._on_wire[conn]
            if answered:
                self._recover(dest, shape)
            if shape is not None and self._held_back(dest, shape):
                opener.close_later(conn)  # paused meanwhile: the queue went back to the store
                return
            if broke is None:
                cap = shape.messages_per_connection if shape is not None else None
                if cap is not None and conn.messages_sent >= cap:
                    # The rule's cap. Its slots come back once it is closed: the next
                    # connection waits for them only when the limits are reached.
                    opener.close_later(conn)
                else:
                    opener.release(key, conn)
                if self._others_wait(dest):
                    return  # the session's end gives it to them; this queue waits its turn
                continue
            opener.close_later(conn)
            last_error = broke
            last_where = Where.of(conn, need)
            if not isinstance(broke, RequireTLSFailure):
                unasked = (last_error, last_where)
            if broke.reply is not None and not reused and not answered:
                replied = (broke, last_where)  # the server refused this new connection
            # A connection that took messages before it ended (a server's limit of
            # messages per connection) says nothing against this address: the rest goes on
            # a new one. Each such round finishes an item, so the loop ends. Nor is a stale
            # idle connection a reason to give up the host.
            if not reused and not answered:
                # The address failed the queue, as one that refused its greeting does.
                _meet(dest.queue, broke, last_where)
                index += 1
        if not dest.queue or self._leave_to_others(dest):
            return
        if isinstance(last_error, RequireTLSFailure) and unasked is not None:
            # 5.7.30 only when no MX host offers REQUIRETLS: one that could not be asked
            # this time may, so the recipients wait for it (RFC 8689 §4.2.1).
            last_error, last_where = unasked
        if not isinstance(last_error, RequireTLSFailure):
            # A 5xx greeting refuses the connection, not the recipients: with every host
            # exhausted the mail is deferred, as Postfix does.
            last_error = _temporary(last_error)
        self._give_up(dest, last_error, last_where)

    @staticmethod
    def _leave_to_others(dest: _Destination) -> bool:
        """Whether other sessions of ``dest`` are still at it, for a session that failed:
        it then leaves the queue to them, and the destination runs with fewer sessions
        until mail goes again (see :meth:`_recover`)."""
        if dest.sessions <= 1:
            return False
        dest.limit = max(1, dest.sessions - 1)
        return True

    def _recover(self, dest: _Destination, shape: Shape | None) -> None:
        """A connection of ``dest`` took mail: one session given up while others ran (see
        :meth:`_deliver`) comes back, as Postfix's concurrency feedback raises the window
        again after it lowered it. Lowered for good, a busy domain was held to one session
        for as long as it had work after a single failed connection. One per connection,
        not per message: a server that takes one connection at a time refuses the extra
        one once per connection, not once per message."""
        ceiling = self._config.max_per_destination
        if shape is not None and shape.max_connections is not None:
            ceiling = min(ceiling, shape.max_connections)
        if dest.limit < ceiling:
            dest.limit += 1
            self._start_sessions(dest)

    async def _open(
        self,
        dest: _Destination,
        host: str,
        ip: str,
        need: TLSRequirement,
        budget: SocketBudget | None,
    ) -> tuple[SMTPConnection, TLSRequirement]:
        """A new connection under ``need`` (counted against ``budget`` too, a shaping
        rule's), and the requirement it was opened under: when TLS fails and ``need`` has
        a fallback (MTA-STS testing), the connection made again in the fallback mode.
        ``observe_tls`` hears how the first connection went."""
        observe = None if dest.tls_report else self._observe_tls
        try:
            conn = await self._opener.open(host, ip, need, budget)
        except DeliveryError as exc:
            if observe is not None:
                observe(dest.domain, need, host, ip, exc)
            if need.fallback is None or not isinstance(exc, TLSHandshakeError | TLSRequiredError):
                raise
            need = self._tls.fallback(need, host, exc.text)
            return await self._opener.open(host, ip, need, budget), need
        if observe is not None:
            observe(dest.domain, need, host, ip, conn)
        return conn, need

    def _park_at(self, dest: _Destination, ip: str) -> None:
        """Let ``dest`` wait, without a session, until a connection being opened to
        ``ip`` is made or fails (see :meth:`_opened`)."""
        if dest.parked:
            return  # its other session parked it already (here, or for its rule's slot)
        dest.parked = True
        self._parked_at.setdefault(ip, deque()).append(dest)

    def _opened(self, ip: str) -> None:
        """A connection to ``ip`` was made, or failed: one fewer being opened, and every
        destination parked at ``ip`` tries again. All, not one: a destination woken that
        does not open to ``ip`` (its queue withdrawn, the address now tried after the
        others) would leave those behind it parked with nothing left to wake them; those
        that find the address still at its bound park again."""
        left = self._opening[ip] - 1
        if left:
            self._opening[ip] = left
        else:
            del self._opening[ip]
        parked = self._parked_at.pop(ip, None)
        if not parked:
            return
        for dest in parked:
            dest.parked = False
        for dest in parked:
            if dest.queue:
                self._start_sessions(dest)
            elif dest.sessions == 0 and self._destinations.get(dest.key) is dest:
                del self._destinations[dest.key]

    def _destination(self, dest: _Destination, route: Route, mx: MXHost) -> Destination:
        return Destination(
            domain=dest.domain,
            mx_host=mx.name,
            mx_secure=route.secure,
            host_secure=mx.secure,
            tls_optional=dest.tls_optional,
            tls_report=dest.tls_report,
            require_tls=dest.require_tls,
            mx_canonical=mx.canonical,
            # The names the MX records were asked for: none for an implicit MX or a relay.
            next_hops=() if route is self._relay_route else route.next_hops,
        )

    async def _stream(
        self,
        dest: _Destination,
        conn: SMTPConnection,
        reused: bool,
        need: TLSRequirement,
        lane: _Lane,
        inflight: _InFlight,
        retry: list[_Work],
        shape: Shape | None = None,
        took: _Took | None = None,
    ) -> tuple[DeliveryError | None, bool]:
        """Send the destination's items over ``conn`` until none is left, the connection
        reaches its message cap, it breaks, or the next item is of a lower lane that has
        no session to spare for it (:meth:`_may_carry`). With a ``shape``, also until its
        rate allows no more now or it is paused. Returns the error it broke with (None if
        it did not), and whether any transaction on it got a reply to its content.
        ``inflight``: where the transactions submitted and not yet answered are kept;
        ``retry``: the work of those that broke, for another session; ``took``: told once
        a transaction got a reply to its content, for a stop that cuts this short."""
        cap = self._config.max_messages_per_connection
        if shape is not None and shape.messages_per_connection is not None:
            cap = min(cap, shape.messages_per_connection)
        queue = dest.queue
        where = Where.of(conn, need)
        # The shape this server's throttling replies pause: none when the server is a
        # backup MX outside the rule, whose 421 is then a refusal as without shaping.
        pausing = shape if shape is not None and self._heeds(shape, dest, conn.host) else None
        error: DeliveryError | None = None
        answered = False
        # The server said it takes no more messages on this connection (a 421 to MAIL
        # for its limit per connection, or any 421 to MAIL once the connection took
        # messages or was reused): what it cut was not tried (see below).
        limited = False
        # The server refused the connection with a 421 (to MAIL, RCPT, DATA or the final
        # dot) before it took any message (see below): what the session held goes on
        # with the queue, no session counted.
        refused = False
        # A transaction failed on the wire (cut), and others never went on it (unwritten).
        cut = unwritten = False
        reset = reused  # an idle connection gets an RSET (free when pipelined)
        while True:
            while (
                error is None
                and queue
                and len(inflight) < _DEPTH
                and conn.usable
                and conn.messages_sent < cap
            ):
                token = queue[0].item.lease_token
                verdict = True if self._may_start is None else self._may_start(token)
                if isinstance(verdict, asyncio.Future):
                    if inflight:
                        break  # read the replies meanwhile, then ask again
                    await asyncio.wait([verdict])  # not cancelled with this session
                    continue
                if not verdict:
                    # Its lease may be another worker's now: its work went back to the
                    # store (withdraw took it out of this queue too).
                    if token not in self._lost:
                        self.withdraw(token)
                    if queue and queue[0].item.lease_token == token:
                        # A queue withdraw did not reach: given back here, so that the
                        # loop always moves on.
                        self._give_back([queue.popleft()])
                    continue
                head = queue[0].item
                if head.expires_at is not None and self._outcomes.is_expired(head):
                    # It expired while it waited its turn here (behind a slow queue, a
                    # rate, a busy lane): failed as expired, not sent late.
                    queue.popleft()
                    self._done(self._outcomes.expired(head))
                    continue
                if not self._may_carry(queue[0], lane):
                    break
                if shape is not None and not self._may_send(shape):
                    break
                work = queue.popleft()
                dest.moved = now = time.monotonic()
                if not work.started:
                    work.started = now
                limit = dest.recipient_limit
                if limit is not None and len(work.item.recipients) > limit:
                    # Named past the server's limit, the rest would be refused for it
                    # again in every transaction: with one a transaction, 100 recipients
                    # cost 5,050 RCPTs. They go in the next transactions instead.
                    later, work = _cap(work, limit)
                    queue.appendleft(later)
                try:
                    future = self._submit(conn, work, reset, where)
                except DeliveryError as exc:
                    error = exc
                    retry.append(work)
                    break
                if future is not None:
                    # The RSET went with it. Not before: one decided without the wire
                    # (over the server's SIZE, say) sent nothing, and the next would go
                    # without it, so that a server done with the idle connection
                    # answered its MAIL with the 421, which defers the recipients.
                    reset = False
                    inflight.append((work, future))
            if not inflight:
                break
            work, future = inflight[0]
            try:
                # Left in ``inflight`` until answered: a stop that cancels this session
                # still finds what it came to (_report_cut_off; the future keeps its
                # outcome once cancelled). Not shielded: the extra loop turn split the
                # pipelined writes of the transactions behind it.
                # _reply only for a task worker (hold_cancels): no frame more per
                # transaction on the hot path of the others.
                result = await (self._reply(future) if self.hold_cancels else future)
            except Withdrawn:
                # Taken back before its content went (see withdraw): back to the store
                # untried, and the session goes on with the rest.
                inflight.popleft()
                self._give_back([work])
                continue
            except DeliveryError as exc:
                exc.host = exc.host or conn.host
                error = error or exc
                if not was_written(exc):
                    # Queued behind the transaction the session broke on, none of its
                    # commands sent: not tried, nor is what waits behind it (see below).
                    inflight.popleft()
                    if refused:
                        retry.append(work)  # the connection's refusal is the queue's too
                        continue
                    work.unsent = exc
                    unwritten = True
                    if pausing is not None:
                        await self._throttled_session(pausing, exc)
                    retry.append(work)
                    continue
                work.unsent = None
                before = answered_before(exc)  # cut by a 421 to RCPT, a hang-up, a timeout
                rest = work if before is None else self._decide_refused(work, before, where)
                inflight.popleft()
                if rest is not None and pausing is not None:
                    if isinstance(exc, EnvelopeCut) and await self._throttled_cut(
                        pausing, rest, exc, where
                    ):
                        cut = True
                        continue
                    # Not this transaction's own reply (a 421 4.7.28 to RSET, the session
                    # aborted by one): the destination is paused all the same, and the
                    # work goes back unattempted with the rest of its queue.
                    await self._throttled_session(pausing, exc)
                if refused or (isinstance(exc, EnvelopeCut) and not (reused or answered)):
                    # A 421 to RCPT on a connection that took no message refuses the
                    # connection, as one to MAIL does (see below); a transaction cut by
                    # such a refusal ahead of it (its envelope went with the content the
                    # server refused) is refused with the connection.
                    refused = True
                else:
                    cut = True
                if rest is not None:
                    rest.met = (exc, where)  # its commands went: tried, and cut short
                    retry.append(rest)
                continue
            closing = None if reused or answered else _refusal(result, shaping=pausing is not None)
            if closing is not None:
                # RFC 5321 §3.8: a 421 to MAIL (to RCPT above, to DATA or the final dot) on
                # a connection that took no message is the server refusing the connection
                # ("service not available", closing the channel), as a 421 to its greeting
                # or EHLO is, not this message: the session ends, and the work goes on
                # with the queue to the next address, none of it counted (Postfix: a site
                # failure). With every address tried the queue is deferred with this reply
                # (an attempt each, as after a refused greeting), not handed back due at
                # once to be refused again on a new connection, one message per
                # connection. A recipient the server refused by its own RCPT reply is
                # decided by it, as when a 421 to RCPT cuts the envelope.
                inflight.popleft()
                error = failure(closing[1], host=conn.host, what=closing[0])
                refused = True
                rest = self._decide_refused(work, result, where)
                if rest is not None:
                    retry.append(rest)
                continue
            if at_connection_limit(result) or ((reused or answered) and _closing_at_mail(result)):
                # Not tried: first on the next connection (see _deliver), and the session
                # ends here, as the server closes. So for any 421 to MAIL on a connection
                # that took messages (or was kept for reuse): RFC 5321 §3.8, the server
                # closes the channel, as one that closes without a word does (a limit in
                # words the reasons do not know, a shutdown), and the message was not
                # refused. On a connection that took none, see above.
                inflight.popleft()
                assert result.mail is not None
                error = error or failure(result.mail, host=conn.host, what="MAIL")
                limited = True
                work.unsent = None  # its MAIL went: deferred with the session, as before
                retry.append(work)
                continue
            if result.final is not None and not answered:
                answered = True
                if took is not None:
                    # Its results are out: a stop that cuts this session short sees the
                    # transactions still in flight only (see _report_cut_off).
                    took.answered = True
            over = over_recipient_limit(result)
            if over:
                taken = recipients_taken(result)
                if taken is not None:
                    known = dest.recipient_limit
                    dest.recipient_limit = taken if known is None else min(known, taken)
                later, work, result = _split_off(work, result, over)
                inflight[0] = (work, future)  # those over the limit are queued: not twice
                if work.item.lease_token in self._lost:
                    # Taken over while on the wire: a new transaction here would send
                    # them twice, as the worker holding the lease now sends them too.
                    self._give_back([later])
                else:
                    queue.appendleft(later)
            results = self._outcomes.from_transaction(work.item, result, work.started, where)
            if pausing is not None:
                results = await self._heed_throttle(pausing, work.item, result, results)
            inflight.popleft()  # kept until its results are out: see _report_cut_off
            self._done(results)
        if retry and self._lost:
            # Work of a lease taken over while it was on the wire: the other worker
            # delivers it; another session here would send it twice.
            lost = [work for work in retry if work.item.lease_token in self._lost]
            retry = [work for work in retry if work.item.lease_token not in self._lost]
            self._give_back(lost)
        # A session that a throttling reply ended (a 421 to another transaction's final
        # dot closes it) is the destination's pause, not this work's failure: the work
        # goes back unattempted with the rest of the queue (see _held_back), never
        # deferred with a backoff of its own for that session.
        shaper = self._shaper
        paused = shape is not None and shaper is not None and shaper.pause_of(shape) is not None
        if (cut or unwritten) and queue:
            # The session broke on a transaction on the wire: the work still waiting
            # for it here was not tried either (a stall at one recipient's RCPT must not
            # defer the mail queued behind it, see _give_up).
            assert error is not None
            for work in queue:
                if work.unsent is None:
                    work.unsent = error
        for work in reversed(retry):
            # mx_session_limit bounds the sessions an attempt opens: a connection from the
            # idle cache was opened for earlier mail, and one the server dropped while it
            # sat there (its idle timeout, a restart) must not use up the item's sessions
            # before a new connection was even tried. The cache is finite: this ends.
            # Nor does a connection that took messages before it ended, or refused one
            # for its limit of messages per connection, count against the work it cut:
            # that server takes so many per connection (Exim's "421 too many messages
            # in this connection", or a close without a word), and the work behind them
            # was not tried. Each such connection finished an item or the server named
            # its limit, and the work cut goes first on the next: this ends too.
            if work.unsent is not None or refused:
                # Not tried, or refused with the connection (as by its greeting): no
                # session counts against it.
                queue.appendleft(work)
                continue
            if not reused and not paused and not answered and not limited:
                work.broken_sessions += 1
            if work.broken_sessions >= self._config.mx_session_limit:
                assert error is not None
                self._done(self._outcomes.from_error(work.item, error, work.started, where))
            else:
                queue.appendleft(work)
        if error is None and not conn.usable:
            error = conn.error or SMTPConnectError(
                f"the connection to {conn.host} ended", host=conn.host
            )
        return error, answered

    def _report_cut_off(
        self, inflight: _InFlight, where: Where, *, reused: bool = False
    ) -> list[_Work]:
        """A session cancelled (the worker stops) or ended by a bug with ``inflight``
        transactions on its connection, which is dropped now: each settled with what it
        came to. One whose content went and whose reply did not come is uncertain (RFC
        5321 §4.5.3.2.6), as when the connection is lost there, and one answered meanwhile
        has its replies: their results are reported (the worker records them before it
        ends). Given back with the lease instead, as if never sent, such a message went
        out again at once. Returns the rest (not tried, cut before the content went, or
        whose results the bug kept from being made), which a stop gives back with the
        lease. As in :meth:`_stream`, a 421 to MAIL on a connection that was ``reused``
        or answered a message ahead of it is no attempt: not tried. ``reused`` says so
        too of a connection that answered a message whose results are out already (the
        transactions here cannot tell)."""
        left: list[_Work] = []
        # Whether the connection took a message, as _stream's ``answered``: reused, or a
        # transaction ahead here was answered (a settled 421 is cut off only behind one
        # still here: the session was awaiting it, or the store for its throttle).
        used = reused
        for work, future in inflight:
            settled: TransactionResult | BaseException | None = None
            if future.cancelled():
                # By the stop that cancelled the session awaiting it; the connection's
                # abandon has settled it since (uncertain after the final dot, say).
                settled = getattr(future, "outcome", None)
            elif future.done():
                settled = future.exception() or future.result()
            if settled is None or isinstance(settled, BaseException):
                left.append(work)
                continue
            result = settled
            if at_connection_limit(result) or (used and _closing_at_mail(result)):
                left.append(work)  # not tried
                continue
            used = used or result.final is not None
            over = over_recipient_limit(result)
            if over:
                # Not tried: left (unless queued for a next transaction already, then
                # out of the work here).
                later, work, result = _split_off(work, result, over)
                if later.item.recipients:
                    left.append(later)
            try:
                results = self._outcomes.from_transaction(work.item, result, work.started, where)
            except Exception:
                log.exception("delivery of %s to %s crashed", work.item.message_id, where.host)
                left.append(work)
                continue
            self._done(results)
        inflight.clear()
        return left

    def _decide_refused(
        self, work: _Work, answered: TransactionResult, where: Where
    ) -> _Work | None:
        """The recipients of ``work`` the server refused before the transaction was cut
        short (a ``421`` to RCPT, the connection lost or timed out before the content went)
        get their results now, from their own replies; what is left to try again (None
        when nothing is)."""
        refused = refused_before_cut(answered)
        if not refused:
            return work
        rest = frozenset(r.address for r in work.item.recipients) - refused
        later, decided, result = _split_off(work, answered, rest)
        self._done(self._outcomes.from_transaction(decided.item, result, work.started, where))
        return later if later.item.recipients else None

    def _submit(
        self, conn: SMTPConnection, work: _Work, reset: bool, where: Where
    ) -> asyncio.Future[TransactionResult] | None:
        """Hand ``work`` to ``conn``; None when it was decided without the wire."""
        if work.item.smtputf8 and "SMTPUTF8" not in conn.extensions:
            self._fail_utf8_recipients(conn, work, where)
        item = work.item
        try:
            if self._config.dkim is not None and item.data.startswith(b"DKIM-Signature:"):
                # In here: out of descriptors, loading the signer fails (EMFILE), and
                # the session ended there with this item in hand, never recorded.
                self._resign_stale(work, self._config.dkim)
                item = work.item
            data, eightbit = item.data, item.eightbit
            if eightbit and "8BITMIME" not in conn.extensions:
                if work.seven_bit is None:
                    # Loaded here: the encoders (and the stdlib email package) are needed
                    # only by a server without 8BITMIME, which few are.
                    from mailstrom.message.encoding import downgrade_to_7bit

                    work.seven_bit = downgrade_to_7bit(data)
                    if work.seven_bit.startswith(b"DKIM-Signature:"):
                        # Without keys here (signed where send_email ran), ours cannot
                        # be made anew over these bytes: they go, as they would fail,
                        # and the status says so.
                        from mailstrom.dkim.config import DKIMConfig

                        self._resign_downgraded(work, self._config.dkim or DKIMConfig(keys=()))
                data, eightbit = work.seven_bit, False
            # The result records the signatures of what this connection got.
            dkim = work.dkim
            if not eightbit and work.seven_bit_dkim is not None:
                dkim = work.seven_bit_dkim
            if item.dkim is not dkim:
                item = work.item = replace(item, dkim=dkim)
            # RFC 3461 parameters go only to a server that offers DSN.
            dsn_mail, dsn_rcpt = dsn_params(item) if "DSN" in conn.extensions else (b"", ())
            return conn.submit(
                envelope_from=item.envelope_from,
                recipients=[r.address for r in item.recipients],
                data=data,
                smtputf8=item.smtputf8 and needs_smtputf8(item),
                eightbit=eightbit,
                reset=reset,
                dsn_mail=dsn_mail,
                dsn_rcpt=dsn_rcpt,
                requiretls=item.require_tls,
            )
        except PermanentFailure as exc:
            # Too large for this server, or SMTPUTF8 needed and not offered: nothing sent.
            exc.host = exc.host or conn.host
            self._done(self._outcomes.from_error(item, exc, work.started, where))
            return None
        except DeliveryError:
            raise
        except Exception as exc:
            shortage = local_shortage(exc)
            if shortage is not None:
                # Out of descriptors, a module loaded at its first use (the 7-bit
                # downgrade's encoders, the DKIM signer) (EMFILE): this host's
                # shortage, no attempt, not a crash.
                error: TemporaryFailure = LocalResourceShortage(
                    "preparing the message", shortage, host=conn.host
                )
            else:
                # A bug (say, in the 7-bit downgrade) fails this item alone, deferred.
                log.exception("delivery of %s to %s crashed", item.message_id, item.domain)
                error = TemporaryFailure(f"internal error: {type(exc).__name__}: {exc}")
            # A shortage yields to what another MX host said of this item, as it does in
            # _fail_queue: it was tried, and spends an attempt.
            self._failed_with(work, error, where, time.monotonic())
            return None

    def _resign_stale(self, work: _Work, dkim: DKIMConfig) -> None:
        """Sign ``work``'s message again when a signature it was queued with would have
        expired by the time a receiver checks it (a retry days later, a released hold),
        or was made by a key since rotated away (see :func:`resign_stale`): once per
        message, its later attempts send the bytes made then while they are good."""
        resigned = self._resigned
        if resigned is None:
            # Loaded here: a worker signs nothing else (the keys came with the config).
            from mailstrom.dkim.resigned import ResignedMessages

            resigned = self._resigned = ResignedMessages(dkim)
        item = work.item
        queued = item.data if work.queued is None else work.queued
        try:
            signed = resigned.sign(item.message_id, queued, now=self._outcomes.now())
        except Exception as exc:
            if local_shortage(exc) is not None:
                # Out of descriptors (a module the signer loads late, EMFILE): this
                # host's shortage, told by _submit (no attempt), not a stale signature.
                raise
            # A bug here must not hold the mail back: an expired signature is no worse
            # than none, which is what receivers make of it.
            log.exception("signing %s again failed; it goes as it was", item.message_id)
            return
        if signed is not None:
            data, work.dkim, work.ours = signed
            work.queued = queued
            # The bytes made at an earlier submit, still good, keep their 7-bit form.
            if data != item.data:
                work.item = replace(item, data=data)
                work.seven_bit = work.seven_bit_dkim = None  # of the bytes before

    def _resign_downgraded(self, work: _Work, dkim: DKIMConfig) -> None:
        """Sign ``work``'s 7-bit downgrade anew with our keys: a message that came
        signed by the application keeps its 8-bit body (see ``prepare``), and ours,
        made over that body, would fail over the re-encoded one. With no keys (``dkim``
        empty: a worker configured without them) ours go, and the status says so."""
        from mailstrom.dkim.signing import resign_stale_top

        assert work.seven_bit is not None
        try:
            # Ours as _resign_stale left them: one of another key domain kept there
            # has an older t= than those made, and is no longer told by its layout.
            found = resign_stale_top(
                work.seven_bit, dkim, now=self._outcomes.now(), ours=work.ours, downgraded=True
            )
        except Exception as exc:
            if local_shortage(exc) is not None:
                raise  # as in _resign_stale
            # As in _resign_stale: a bug here must not hold the mail back.
            log.exception("signing %s anew after the 7-bit downgrade failed", work.item.message_id)
            return
        if found is not None:
            work.seven_bit, work.seven_bit_dkim = found[0], found[1]

    def _fail_utf8_recipients(self, conn: SMTPConnection, work: _Work, where: Where) -> None:
        """At ``conn``, a server without SMTPUTF8, fail the recipients of ``work`` whose own
        address alone needs it (553 5.6.7), and keep the others in ``work`` when the rest of
        their transaction (sender, header fields) is ASCII. A UTF-8 Bcc address in the
        domain of the other recipients shares their transaction: it alone cannot go, and
        failing the whole transaction for it (as :meth:`SMTPConnection.submit` must) failed
        every one of them for good, as hardening #5 keeps one bad address from doing."""
        item = work.item
        utf8 = [r for r in item.recipients if not r.address.isascii()]
        if not utf8 or len(utf8) == len(item.recipients):
            return  # nobody to keep apart: submit decides for the whole transaction
        rest = replace(item, recipients=tuple(r for r in item.recipients if r.address.isascii()))
        if needs_smtputf8(rest):
            return  # the sender or the header fields need it: every recipient fails
        error = PermanentFailure(
            f"recipient address needs SMTPUTF8, which {conn.host} does not support",
            code=553,
            enhanced="5.6.7",
            host=conn.host,
        )
        self._done(self._outcomes.from_error(item, error, work.started, where, recipients=utf8))
        work.item = rest

    # --- traffic shaping -----------------------------------------------------------------

    def _may_send(self, shape: Shape) -> bool:
        """Whether one more message may go to ``shape`` now (using a rate token)."""
        assert self._shaper is not None
        return self._shaper.take(shape)

    async def _may_go_on(self, dest: _Destination, shape: Shape) -> bool:
        """Wait for the rate to allow the next message; False (queue given back) when the
        destination is paused meanwhile, or the worker stops (:meth:`drain`). True only
        with work left in the queue (given back, or withdrawn, while it waited)."""
        assert self._shaper is not None
        if await self._shaper.wait_to_send(shape):
            return bool(dest.queue)
        if not self._held_back(dest, shape) and self._draining:
            self._rate_back(shape, dest)
        return False

    async def _may_connect(self, dest: _Destination, shape: Shape) -> bool:
        """Wait for the connection rate to allow a new connection (one token, or one
        ``dest`` kept from a connection it did not make); False (queue given back) when
        the destination is paused meanwhile."""
        assert self._shaper is not None
        if dest.connect_tokens:
            if self._shaper.pause_of(shape) is None:
                dest.connect_tokens -= 1
                return True
            # Taken before the pause: void, as message tokens are (see Shape.tokens).
            dest.connect_tokens = 0
        elif await self._shaper.wait_to_connect(shape):
            return True
        if not self._held_back(dest, shape) and self._draining:
            self._rate_back(shape, dest)
        return False

    def _rate_back(self, shape: Shape, dest: _Destination) -> None:
        """The worker stops and ``dest``'s queue would wait for ``shape``'s rate: back to
        the store, as :meth:`drain` gives it back."""
        works = list(dest.queue)
        dest.queue.clear()  # in place: its other sessions read it through their reference
        self._give_back_by_rate(shape, works)

    def _give_back_by_rate(self, shape: Shape, works: list[_Work]) -> None:
        """Give ``works`` back, each due when ``shape``'s message rate would have let it
        go (its place behind the higher lanes' and its own lane's before it, the next
        whole second after), or at once under a connection rate alone: another worker
        taking it all at once would only queue it in memory for the rate again."""
        assert self._shaper is not None
        if not shape.message_buckets:
            self._give_back(works)
            return
        by_due: dict[datetime, list[_Work]] = {}
        for ahead, work in enumerate(sorted(works, key=lambda w: w.rank)):  # stable
            by_due.setdefault(self._shaper.place(shape, ahead), []).append(work)
        for until, due in by_due.items():
            self._give_back(due, until, until_what="the destination's rate lets it go")

    def _held_back(self, dest: _Destination, shape: Shape) -> bool:
        """If ``shape`` is paused, give the destination's queue back (due at the end of
        the pause) and say so."""
        assert self._shaper is not None
        pause = self._shaper.pause_of(shape)
        if pause is None:
            return False
        works = list(dest.queue)
        dest.queue.clear()
        self._postpone(works, pause)
        return True

    def _postpone(self, works: list[_Work], pause: DestinationThrottle) -> None:
        self._give_back(works, pause.until, pause.destination)

    def _give_back(
        self,
        works: list[_Work],
        until: datetime | None = None,
        destination: str | None = None,
        until_what: str = "the destination's pause ends",
    ) -> None:
        """Out of flight, and back to the store through ``on_postpone``, due at ``until``
        (at once when None). Work that the retry policy gives up on before ``until``
        (``retry.max_age`` from when it was queued) fails now instead, as a recipient
        deferred into a pause does (:func:`_until_pause`): postponed, it came back after
        its retries had ended and was attempted once more."""
        if until is not None:
            works = self._within_max_age(works, until, until_what)
        items = [work.item for work in works]
        self.in_flight -= sum(len(item.recipients) for item in items)
        if self.in_flight <= 0:
            self.idle.set()
        for item in items:
            self._let_go(item.lease_token, len(item.recipients))
        if items and self._on_postpone is not None:
            when = until if until is not None else self._outcomes.now()
            expiring = [i for i in items if i.expires_at is not None and i.expires_at < when]
            if expiring:
                # Each comes back at its expiry (and fails as expired then), not later.
                items = [i for i in items if i.expires_at is None or i.expires_at >= when]
                for item in expiring:
                    self._on_postpone([item], _not_past_expiry(when, item), destination)
            if items:
                self._on_postpone(items, when, destination)

    def _within_max_age(self, works: list[_Work], until: datetime, when: str) -> list[_Work]:
        """``works`` less those the retry policy gives up on before ``until`` (when
        ``when``): ``retry.max_age`` from when they were queued. Those fail now, without
        an attempt (class ``expired``)."""
        max_age = self._config.retry.max_age
        if max_age is None:
            return works
        # Counted from when the recipients could first go, as next_attempt counts it.
        last = until - max_age
        late = [w for w in works if _first_due(w.item) < last]
        if not late:
            return works
        for work in late:
            self._done(self._outcomes.expired(work.item, why=_past_max_age(max_age, when)))
        return [w for w in works if _first_due(w.item) >= last]

    def _postpone_later(self, work: _Work, until: datetime) -> None:
        """Give ``work`` back, due at ``until``; the items of one lease are gathered and
        given back in one call per due time. Work the retry policy gives up on before
        then fails now, as in :meth:`_give_back`: given back, it came back after its
        retries had ended and was attempted once more."""
        if not self._within_max_age([work], until, "the destination's rate lets it go"):
            return
        self.in_flight -= len(work.item.recipients)
        if self.in_flight <= 0:
            self.idle.set()
        self._let_go(work.item.lease_token, len(work.item.recipients))
        if not self._spread:
            asyncio.get_running_loop().call_soon(self._flush_spread)
        self._spread.setdefault(_not_past_expiry(until, work.item), []).append(work.item)

    def _flush_spread(self) -> None:
        spread, self._spread = self._spread, {}
        if self._on_postpone is None:
            return
        for until, items in spread.items():
            self._on_postpone(items, until, None)

    def _unpark(self, shape: Shape) -> None:
        """Start the destinations waiting for a slot of ``shape``, as slots allow."""
        while shape.parked and shape.has_slot():
            dest: _Destination = shape.parked.popleft()
            dest.parked = False
            if dest.queue:
                dest.woken_by = shape
                self._start_sessions(dest)
                break  # its session takes the slot once its route is known
            if dest.sessions == 0 and self._destinations.get(dest.key) is dest:
                del self._destinations[dest.key]

    async def _throttled_connecting(
        self, dest: _Destination, shape: Shape, exc: DeliveryError, where: Where
    ) -> bool:
        """A 421 to the greeting or EHLO pauses the destination (its other hosts too: they
        share the limit), as does a rate-limit reply anywhere in the set-up. The items this
        session held were attempted (at ``where``): they are deferred with that reply, due
        at the end of the pause. Another 421 (to STARTTLS, AUTH) ends that session alone:
        the next address is tried, as after a failed TLS negotiation."""
        assert self._shaper is not None
        if exc.code is None or not self._heeds(shape, dest, exc.host):
            return False
        reply = exc.reply or SMTPReply(code=exc.code, enhanced=exc.enhanced, text=exc.text)
        if not is_throttling(reply, connecting=isinstance(exc, ServiceClosing)):
            return False
        # The work queued when the connection failed: what arrives while the pause is
        # written (a store answering from another thread) never went near this server,
        # and goes back unattempted (_held_back, at the next session's start).
        attempted = set(dest.queue)
        held = [(w.item.message_id, r.address) for w in dest.queue for r in w.item.recipients]
        pause = await self._shaper.throttled(shape, exc.text, held)
        now = time.monotonic()
        queue = dest.queue
        works = [w for w in queue if w in attempted]  # not those withdrawn meanwhile
        later = [w for w in queue if w not in attempted]
        queue.clear()
        queue.extend(later)  # in place: other sessions read it through their reference
        for work in works:
            results = self._outcomes.from_error(work.item, exc, work.started or now, where)
            self._done(_until_pause(results, pause, work.item, self._config.retry.max_age))
        return True

    async def _heed_throttle(
        self,
        shape: Shape,
        item: WorkItem,
        result: TransactionResult,
        results: list[RecipientResult],
    ) -> list[RecipientResult]:
        """A throttling reply in ``result`` pauses the destination; its deferred
        recipients then come back at the end of the pause, not after a backoff of their
        own."""
        assert self._shaper is not None
        throttling = next((r for r in _replies(result) if is_throttling(r)), None)
        if throttling is None:
            return results
        # The transaction's results must be reported whatever the pause does: lost, they
        # would leave the item leased, and its delivered recipients would be sent again
        # once the lease ran out. Unpaused, the deferred ones keep their own backoff.
        paused = await self._pause_deferred(shape, str(throttling), results, item)
        return results if paused is None else paused

    async def _pause_deferred(
        self, shape: Shape, reply: str, results: list[RecipientResult], item: WorkItem
    ) -> list[RecipientResult] | None:
        """Pause ``shape`` after the throttling ``reply``: ``results`` with their deferred
        recipients due at the end of the pause, or None when no pause could be made
        (logged)."""
        assert self._shaper is not None
        deferred = [
            (r.message_id, r.address) for r in results if r.state is RecipientState.DEFERRED
        ]
        try:
            pause = await self._shaper.throttled(shape, reply, deferred)
        except Exception:
            log.exception("could not pause %s after a throttling reply", shape.key)
            return None
        return _until_pause(results, pause, item, self._config.retry.max_age)

    async def _throttled_cut(
        self, shape: Shape, work: _Work, exc: EnvelopeCut, where: Where
    ) -> bool:
        """A throttling ``421`` to RCPT (Gmail's 4.7.28, Yahoo's TSS04: the server closes
        there) pauses the destination as one to MAIL or to the final dot does, rather than
        send ``work`` again at once on a new session. Its recipients were attempted: they
        are deferred with that reply, due at the end of the pause. False (``work`` then goes
        on as after any broken session) for another 421, or when no pause could be made."""
        assert self._shaper is not None
        reply = exc.reply
        if reply is None or not is_throttling(reply):
            return False
        results = self._outcomes.from_error(work.item, exc, work.started, where)
        paused = await self._pause_deferred(shape, str(reply), results, work.item)
        if paused is None:
            return False
        self._done(paused)
        return True

    async def _throttled_session(self, shape: Shape, exc: DeliveryError) -> None:
        """Pause ``shape`` when ``exc``, which ended the session, carries a throttling
        reply and no pause runs yet (a failure to make one is logged)."""
        assert self._shaper is not None
        reply = exc.reply
        if reply is None or not is_throttling(reply) or self._shaper.pause_of(shape) is not None:
            return
        try:
            await self._shaper.throttled(shape, str(reply))
        except Exception:
            log.exception("could not pause %s after a throttling reply", shape.key)

    def _give_up(self, dest: _Destination, error: DeliveryError, where: Where) -> None:
        """Every address tried: the queue's work deferred with the last ``error``, but
        for what a session never sent, behind a transaction it broke on (``_Work.unsent``).
        That goes back to the store due at once, no attempt counted, as work given back at
        a stop does: another's stall is not its failure. Each such session tried, or
        failed, some work of its own, which is deferred or decided: the round ends."""
        queue = dest.queue
        if any(work.unsent is not None for work in queue):
            unsent = [work for work in queue if work.unsent is not None]
            kept = [work for work in queue if work.unsent is None]
            queue.clear()
            queue.extend(kept)  # in place: other sessions read it through their reference
            reason = unsent[0].unsent
            assert reason is not None
            log.info(
                "%d item(s) to %s back to the queue, due now: not sent: %s",
                len(unsent),
                dest.domain,
                reason.text,
            )
            self._give_back(unsent)
        self._fail_queue(dest, error, where)

    def _fail_queue(self, dest: _Destination, error: DeliveryError, where: Where) -> None:
        """Every item of the queue deferred (or failed) with ``error`` at ``where``; but
        when that is this host's shortage, an item the destination gave a failure first
        (``_Work.met``) gets that one, temporary, since some host was not asked: it was
        tried, and spends an attempt. Only what met no server spends none."""
        now = time.monotonic()
        queue = dest.queue
        while queue:
            self._failed_with(queue.popleft(), error, where, now)

    def _failed_with(self, work: _Work, error: DeliveryError, where: Where, now: float) -> None:
        """``work`` done with ``error`` at ``where``; but this host's shortage yields to
        a failure the destination gave it first (see :meth:`_fail_queue`)."""
        if isinstance(error, LocalResourceShortage) and work.met is not None:
            met, at = work.met
            failed = self._outcomes.from_error(work.item, _temporary(met), work.started or now, at)
        else:
            failed = self._outcomes.from_error(work.item, error, work.started or now, where)
        self._done(failed)

    def drain(self) -> int:
        """The worker stops: wait for no destination's rate from now on. Work queued for
        a rate is no delivery in flight (the stop's drain waits for those): it goes back
        to the store now, each message due when the rate would have let it go, and so
        does what would wait for a rate later (a message a broken session puts back, a
        new connection under a connection rate). The sessions finish what they sent.
        Returns how many recipients went back now."""
        self._draining = True
        if self._shaper is None:
            return 0
        self._shaper.stop_waiting()
        count = 0
        for shape in self._shaper.rated():
            works: list[_Work] = []
            for key, queue in shape.queues.items():
                works.extend(queue)
                queue.clear()  # in place: its sessions read it through their reference
                dest = self._destinations.get(key)
                if (
                    dest is not None
                    and dest.queue is queue
                    and dest.sessions == 0
                    and not dest.parked
                ):
                    # A waiting one is skipped when its turn comes (its queue is empty).
                    del self._destinations[key]
            count += sum(len(work.item.recipients) for work in works)
            self._give_back_by_rate(shape, works)
        return count

    def withdraw(self, lease_token: str) -> int:
        """Give back, through ``on_postpone`` and due at once, the work of the lease
        ``lease_token`` that no session has started (queued here, or handed to a
        connection with none of its commands written: its session gives that back), and
        from now on what of it a broken session, or a server's limit of recipients per
        transaction, would queue again; returns how many recipients go back. The worker
        does this when its lease was taken over, so that what another worker now
        delivers is not sent twice, and when mail of it was cancelled, held or suspended
        (the store gives back only what the lease still holds)."""
        withdrawn: list[_Work] = []
        for key, dest in list(self._destinations.items()):
            if not any(work.item.lease_token == lease_token for work in dest.queue):
                continue
            kept: list[_Work] = []
            for work in dest.queue:
                (withdrawn if work.item.lease_token == lease_token else kept).append(work)
            # In place: a running session reads the queue through its own reference.
            dest.queue.clear()
            dest.queue.extend(kept)
            if not kept and dest.sessions == 0 and not dest.parked:
                # A waiting one is skipped when its turn comes (its queue is empty).
                del self._destinations[key]
        self._give_back(withdrawn)
        taken = 0
        for conn, inflight in self._on_wire.items():
            for work, future in inflight:
                # Handed to a connection, its content not gone: taken back there (its
                # session gives it back). Pipelined behind another, it went out after
                # the cancel that withdrew it had returned.
                if work.item.lease_token == lease_token and conn.withdraw(future):
                    taken += len(work.item.recipients)
        if lease_token in self._held:  # some of it is on the wire
            self._lost.add(lease_token)
        return sum(len(work.item.recipients) for work in withdrawn) + taken

    def queued(self, lease_token: str) -> list[WorkItem]:
        """The work of the lease ``lease_token`` waiting in the queues (no session has
        started it)."""
        return [
            work.item
            for dest in self._destinations.values()
            for work in dest.queue
            if work.item.lease_token == lease_token
        ]

    def screen(
        self,
        lease_token: str,
        screen: Callable[[WorkItem], tuple[WorkItem | None, list[RecipientResult]]],
    ) -> None:
        """Screen the waiting work of the lease ``lease_token`` again: ``screen`` gives an
        item's recipients that may still go (None: none) and the results of those that
        may not, which are reported at once (the worker's second look at the suppression
        list for work that waited)."""
        refused: list[list[RecipientResult]] = []
        for key, dest in list(self._destinations.items()):
            if not any(work.item.lease_token == lease_token for work in dest.queue):
                continue
            kept: list[_Work] = []
            for work in dest.queue:
                if work.item.lease_token == lease_token:
                    rest, results = screen(work.item)
                    if results:
                        refused.append(results)
                    if rest is None:
                        continue
                    work.item = rest
                kept.append(work)
            # In place: a running session reads the queue through its own reference.
            dest.queue.clear()
            dest.queue.extend(kept)
            if not kept and dest.sessions == 0 and not dest.parked:
                del self._destinations[key]
        for results in refused:
            self._done(results)

    def busy(self, enough: int) -> list[str]:
        """The domains with ``enough`` items or more waiting here (not started): the
        worker's next lease takes none of theirs (see :mod:`mailstrom.stores.fairness`),
        so that a slow destination's backlog does not fill the worker while mail to
        others waits behind it. None with a relay: it is the one destination."""
        if self._relay_route is not None or not self._destinations:
            return []
        waiting: dict[str, int] = {}
        for dest in self._destinations.values():
            if dest.queue:
                waiting[dest.domain] = waiting.get(dest.domain, 0) + len(dest.queue)
        return [domain for domain, n in waiting.items() if n >= enough]

    def relieve(self, stalled_for: float, back_in: timedelta) -> int:
        """Give back, due ``back_in`` from now, the queued work of every destination whose
        sessions have taken nothing from its queue for ``stalled_for`` seconds (a server
        that never greets, a transaction that never ends); returns how many recipients
        went back. The worker asks when it can lease no more: work waiting behind a server
        that does not move held the worker's room, and mail to every other destination
        waited for that server's timeouts. The sessions keep what they started. A
        destination parked for its shaping rule's connection slot (see :meth:`_run`)
        waits behind the rule's sessions the same way, without one of its own: its queue
        goes back too."""
        now = time.monotonic()
        stalled: list[_Work] = []
        for dest in self._destinations.values():
            if dest.queue and (dest.sessions or dest.parked) and now - dest.moved >= stalled_for:
                stalled.extend(dest.queue)
                dest.queue.clear()  # in place: its sessions read it through their own reference
        if not stalled:
            return 0
        log.info(
            "%d item(s) waiting behind a destination that has not moved for %g s go back "
            "to the queue for %s",
            len(stalled),
            stalled_for,
            back_in,
        )
        self._give_back(
            stalled,
            self._outcomes.now() + back_in,
            until_what="the stalled destination's queue is leased again",
        )
        return sum(len(work.item.recipients) for work in stalled)

    # --- upkeep ------------------------------------------------------------------------

    def prune(self) -> None:
        """Close connections idle for too long."""
        self._opener.prune()

    def _still_open(self) -> bool:
        return not self._closing

    async def _reply(self, future: asyncio.Future[TransactionResult]) -> TransactionResult:
        """What the transaction of ``future`` came to. With :attr:`hold_cancels`, a
        cancel of the session that :meth:`close` did not make (asyncio.run ending around
        the worker, which drains instead) waits for it and is then taken back: the
        session goes on as during a stop's drain. Cut off there, the reply to a final dot
        the server had taken was lost, and the content of the transaction pipelined
        behind it went out as the session was dropped, both "uncertain", sent again."""
        if not isinstance(future, Outcome):
            return await future
        future.holds = self._still_open
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            outcome = future.outcome
            if outcome is None or self._closing or task is None or not task.cancelling():
                raise
            while task.uncancel():  # each cancel pending (see Worker._outlive_cancel)
                pass
        if isinstance(outcome, BaseException):
            raise outcome  # (outside the handler: not "during handling of" the cancel)
        return outcome

    def session_tasks(self) -> set[asyncio.Task[None]]:
        """The sessions' tasks running now."""
        return set(self._tasks)

    async def close(self) -> None:
        """Stop every session (their unfinished items get no result) and close connections."""
        # A cancelled session's end would start the next one for the work queued behind
        # it, which nobody would wait for: it opened a connection after the idle ones were
        # closed, and left it open.
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for dest in self._destinations.values():
            dest.queue.clear()
        self._destinations.clear()
        self._waiting.clear()
        self._parked_at.clear()
        # Nothing is in flight any more: what was is the caller's to give back (the
        # worker releases its leases), and a status read after the stop says so.
        self.in_flight = 0
        self._held.clear()
        self._lost.clear()
        self.idle.set()
        await self._opener.close()


def _queued(shape: Shape, rank: int) -> int:
    """Items queued for ``shape`` that go before an item of lane ``rank``: those of its
    lane and the higher ones, over every domain of its rule (they share its rates). A
    lower lane's backlog, which the item goes ahead of, does not hold it back. (A queue
    left empty is forgotten; its destination's next item puts it back.)"""
    queues = shape.queues
    for key in [key for key, queue in queues.items() if not queue]:
        del queues[key]
    count = 0
    for queue in queues.values():
        if queue[-1].rank <= rank:
            count += len(queue)  # the common case, at no cost per item
        else:
            # A queue keeps higher lanes first (_enqueue_by_rank): only its front is read.
            count += sum(1 for _ in itertools.takewhile(lambda w: w.rank <= rank, queue))
    return count


def _until_pause(
    results: list[RecipientResult],
    pause: DestinationThrottle,
    item: WorkItem,
    max_age: timedelta | None,
) -> list[RecipientResult]:
    """``results`` (of ``item``) with every deferred recipient due at the end of ``pause``
    (all of the destination's recipients come back together, not each after a backoff of
    its own), or at the message's expiry when that comes first (as any retry would). One
    whose retries would then fall past the retry policy's ``max_age`` fails now with its
    last reason, as :func:`~mailstrom.policy.backoff.next_attempt` decides for a backoff."""
    until = _not_past_expiry(pause.until, item)
    out = []
    for r in results:
        if r.state is RecipientState.DEFERRED:
            last = None if max_age is None or r.queued_at is None else r.queued_at + max_age
            if last is not None and until > last:
                r = replace(r, state=RecipientState.FAILED, next_attempt_at=None)
            else:
                r = replace(r, next_attempt_at=until)
        out.append(r)
    return out


def _closing_at_mail(result: TransactionResult) -> bool:
    """Whether the server answered ``result``'s MAIL with a ``421`` that closes the
    connection and is no throttle (a throttle pauses the destination, see
    :meth:`Dispatcher._heed_throttle`, and defers what it refused)."""
    mail = result.mail
    return mail is not None and mail.code == 421 and not is_throttling(mail)


def _refusal(result: TransactionResult, *, shaping: bool) -> tuple[str, SMTPReply] | None:
    """The ``421`` that ended ``result`` at MAIL, DATA or the final dot, and the command it
    answered, which on a connection that took no message refuses the connection (a 421 to
    RCPT ends it with :class:`EnvelopeCut` instead); None for another end. Under traffic
    ``shaping`` a throttle is left to pause the destination
    (:meth:`Dispatcher._heed_throttle`)."""
    for what, reply in (
        ("MAIL", result.mail),
        ("DATA", result.data),
        ("the message", result.final),
    ):
        if reply is not None and reply.code == 421:
            return None if shaping and is_throttling(reply) else (what, reply)
    return None


def _meet(queue: deque[_Work], error: DeliveryError, where: Where) -> None:
    """Note on the work in ``queue`` that the destination failed it with ``error``
    (``_Work.met``)."""
    met = (error, where)
    for work in queue:
        work.met = met


def _temporary(error: DeliveryError) -> DeliveryError:
    """``error`` as a temporary failure: a permanent one (a 5xx greeting, a host without
    REQUIRETLS) refuses a connection, not the recipients, when other hosts remain."""
    if not isinstance(error, PermanentFailure):
        return error
    return TemporaryFailure(
        error.text,
        code=error.code,
        enhanced=error.enhanced,
        host=error.host,
        reply=error.reply,
    )


def _of_family(ip: str, family: int) -> bool:
    """Whether ``ip`` is of IP version ``family``; True for a name (a relay's host name,
    whose lookup finds the addresses a socket bound to ``source_address`` can reach)."""
    try:
        return ipaddress.ip_address(ip).version == family
    except ValueError:
        return True


def _preferred(route: Route) -> list[str]:
    """The names of ``route``'s most preferred MX hosts (those of the first host's
    preference): the hosts its mail goes to, whose shaping rule it takes. A backup MX at a
    provider must not put a domain under the provider's rule: a 421 from the domain's own
    server then paused every domain the provider hosts."""
    hosts = route.hosts
    return [host.name for host in hosts if host.preference == hosts[0].preference]


def _first_due(item: WorkItem) -> datetime:
    return min(r.created_at for r in item.recipients)


def _past_max_age(max_age: timedelta, when: str) -> str:
    return f"retry.max_age ({max_age}) would pass before {when}: given up without another attempt"


def _not_past_expiry(until: datetime, item: WorkItem) -> datetime:
    """``until``, or ``item``'s expiry when that comes first: a message is not held back
    past it, but comes back then to fail as expired."""
    expires_at = item.expires_at
    return until if expires_at is None or expires_at >= until else expires_at


def _replies(result: TransactionResult) -> Iterator[SMTPReply | None]:
    """Every reply of ``result``, in the order they came (None for those never sent)."""
    yield result.mail
    for _, reply in result.rcpt:
        yield reply
    yield result.data
    yield result.final


def needs_smtputf8(item: WorkItem) -> bool:
    """Whether the transaction of ``item``, a message marked SMTPUTF8, needs it (RFC 6531
    §3.4): an address of another transaction (a UTF-8 Bcc recipient, or one of an
    explicit envelope) marks the whole message, but this one's envelope and header
    fields, when ASCII, go as any other mail's. An 8-bit body needs 8BITMIME, not
    SMTPUTF8: the header sections of the MIME parts are then read for 8-bit octets."""
    if not item.envelope_from.isascii() or any(not r.address.isascii() for r in item.recipients):
        return True
    data = item.data
    if data.isascii():
        return False
    end = data.find(b"\r\n\r\n")
    if end < 0 or not data[:end].isascii():
        return True
    # Loaded here, as the 7-bit downgrade is: only such a message (a UTF-8 address in
    # another transaction, an 8-bit body) is walked. Read, not judged: prepare() accepted
    # it, perhaps under older input rules, and a part it would refuse today is no reason
    # to need SMTPUTF8 (it sent such a message only to servers offering it).
    from mailstrom.message.mime import eight_bit_part_header

    return eight_bit_part_header(data)


def dsn_params(item: WorkItem) -> tuple[bytes, tuple[bytes, ...]]:
    """The RFC 3461 MAIL and per-RCPT parameters ``item``'s DSN request asks for (the
    ENVID defaults to the message id, which ``mailstrom bounce`` recognises)."""
    dsn = item.dsn
    if dsn is None:
        return b"", ()
    return dsn.mail_params(item.message_id), tuple(
        dsn.rcpt_params(r.address) for r in item.recipients
    )


def _split_off(
    work: _Work, result: TransactionResult, over: frozenset[str]
) -> tuple[_Work, _Work, TransactionResult]:
    """The recipients ``over`` the server's limit, as work for a next transaction, and
    ``work`` and ``result`` without them."""
    item = work.item
    later = tuple(r for r in item.recipients if r.address in over)
    sent = tuple(r for r in item.recipients if r.address not in over)
    return (
        replace(work, item=replace(item, recipients=later)),
        replace(work, item=replace(item, recipients=sent)),
        replace(result, rcpt=tuple((a, reply) for a, reply in result.rcpt if a not in over)),
    )


def _cap(work: _Work, limit: int) -> tuple[_Work, _Work]:
    """``work`` past its first ``limit`` recipients, for a next transaction, and ``work``
    with those only."""
    item = work.item
    return (
        replace(work, item=replace(item, recipients=item.recipients[limit:])),
        replace(work, item=replace(item, recipients=item.recipients[:limit])),
    )


def _enqueue_by_rank(queue: deque[_Work], work: _Work) -> None:
    """Put ``work`` behind every item of its lane and of higher lanes, ahead of lower
    lanes' (items of one lane keep their order). The common case, a lane no higher than
    the last item's, is an append."""
    if not queue or queue[-1].rank <= work.rank:
        queue.append(work)
        return
    for i, queued in enumerate(queue):
        if queued.rank > work.rank:
            queue.insert(i, work)
            return
    queue.append(work)
