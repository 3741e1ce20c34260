"""Traffic shaping in the worker: which rule a destination falls under, whether it is paused,
and the connection slots and rate tokens it may use.

A :class:`Shape` is one destination as shaping sees it: a rule's pattern (every domain
whose MX hosts match ``*.google.com`` shares one shape) or, without a rule, the recipient
domain. The dispatcher asks the :class:`Shaper` before it connects and before each
message; with no rule and no pause the answers cost a dictionary lookup.

What several workers must agree on lives in the store (see ``docs/guide.md``, "Traffic
shaping"): pauses (:meth:`Store.throttle`, read back every ``shaping.refresh`` seconds) and
rate buckets (:meth:`Store.take_tokens`: a worker takes a second's worth at most and keeps
what it took for its own sessions). Connection slots are per worker: a connection belongs
to one process, and a shared count would need expiry for a worker that died holding one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from mailstrom.bounds import MAX_DURATION, MAX_SECONDS
from mailstrom.config import Config
from mailstrom.errors import StoreError
from mailstrom.policy.shaping import DestinationRule, RuleBook, normalise_name
from mailstrom.policy.throttle import (
    CLOCK_SET_BACK,
    TokenBucket,
    TokenGrant,
    bounded,
    next_pause,
    pause_runs,
)
from mailstrom.runtime.socket_budget import SocketBudget
from mailstrom.status import DestinationThrottle
from mailstrom.stores.base import Store

log = logging.getLogger("mailstrom.shaping")

T = TypeVar("T")
StoreCall = Callable[..., Awaitable[Any]]

_STORE_RETRY = 1.0
"""Seconds before asking a failing store for tokens again."""
_HORIZON = 10.0
"""Seconds of a destination's message rate a worker keeps queued in memory; what would
wait longer goes back to the store, due about when the rate allows it, so that it holds
no room other destinations could use."""
_STALE = 60.0
"""Seconds a destination's schedule of mail given back may have mail due (past its first
place) while this worker sends the destination nothing, before the schedule is taken for
stale (see :attr:`Shape.booked`); the poll interval, twice, and a token grant's worth of
the rate come on top."""
_MAX_DOMAINS = 100_000
"""Domains whose rule is remembered; past this the memory is cleared and rebuilt."""


class Shape:
    """One destination's shaping state in this worker (private, mutable)."""

    __slots__ = (
        "booked",
        "booked_at",
        "booked_since",
        "connect_buckets",
        "connections",
        "key",
        "message_buckets",
        "parked",
        "queues",
        "rule",
        "sent_at",
        "sockets",
        "tokens",
        "tokens_until",
        "want",
    )

    def __init__(self, key: str, rule: DestinationRule | None) -> None:
        self.key = key
        self.rule = rule
        self.connections = 0
        """Sessions of this worker holding a connection slot of this destination."""
        self.sockets: SocketBudget | None = None
        """With ``max_connections``: the sockets open to this destination, idle and
        closing ones too (the opener counts them; ``connections`` counts sessions)."""
        self.parked: deque[Any] = deque()
        """Dispatcher destinations waiting for a free slot (the dispatcher's business)."""
        self.queues: dict[str, deque[Any]] = {}
        """The queues of the dispatcher's destinations under this shape's message rate, by
        destination (the dispatcher's business): what is queued counts over all of them."""
        self.tokens = 0
        """Messages this worker may still send under the destination's rates. A pause
        voids them: the store's bucket refills while it lasts, and tokens held through it
        would go out on top of that, at once, to the destination that throttled. They
        lapse, too, once the store's buckets have had the time to refill by as many
        (``tokens_until``): held longer (by a session that could reach no MX host, or
        left when a queue ran dry), they would go out on top of the refilled buckets just
        the same. A session waiting for the rate (:meth:`Shaper.wait_to_send`, before it
        connects or takes an idle connection) drops lapsed ones, and so does each message
        that would use one (:meth:`Shaper.take`)."""
        self.tokens_until: datetime | None = None
        """When ``tokens`` lapse: their count's worth of the slowest rate after they were
        taken (a second for a rate of a second's worth or more)."""
        self.message_buckets: tuple[TokenBucket, ...] = ()
        self.connect_buckets: tuple[TokenBucket, ...] = ()
        self.want = 1
        self.booked: dict[int, datetime] = {}
        """By lane rank (0 the highest): the next free place in the rate's schedule for a
        message of that lane given back. A message books after its own lane's and the
        higher lanes' places, never behind a lower lane's backlog.

        The store may lose what was given back (cancelled, purged, delivered by
        another worker's retry): the schedule then runs ahead of the mail it stands for,
        and new mail would wait behind mail that is gone. Mail given back comes back and
        goes out at the rate from its first place on; a schedule that has had mail due
        for a while (``booked_since``) while this worker sent the destination nothing
        (``sent_at``) is dropped, and the next message books from its own queue again
        (mail still there that comes back at once with it is spread again: the rate's
        tokens hold either way)."""
        self.booked_since: datetime | None = None
        """The first place booked in the current schedule (None without one)."""
        self.booked_at: datetime | None = None
        """When this worker last booked a place (see ``Shaper._clock_for``)."""
        self.sent_at: datetime | None = None
        """When this worker last took message tokens for this destination."""
        if rule is None:
            return
        if rule.max_connections is not None:
            self.sockets = SocketBudget(rule.max_connections)
        buckets = []
        if rule.messages_per_minute is not None:
            buckets.append(
                TokenBucket.per_second(f"{key} messages/minute", rule.messages_per_minute / 60)
            )
        if rule.messages_per_hour is not None:
            buckets.append(
                TokenBucket.per_second(f"{key} messages/hour", rule.messages_per_hour / 3600)
            )
        self.message_buckets = tuple(buckets)
        if buckets:
            self.want = max(1, math.floor(min(b.capacity for b in buckets)))
        if rule.connections_per_minute is not None:
            self.connect_buckets = (
                TokenBucket.per_second(
                    f"{key} connections/minute", rule.connections_per_minute / 60
                ),
            )

    @property
    def max_connections(self) -> int | None:
        return self.rule.max_connections if self.rule is not None else None

    @property
    def messages_per_connection(self) -> int | None:
        return self.rule.messages_per_connection if self.rule is not None else None

    def heeds(self, domain: str, host: str | None) -> bool:
        """Whether a throttling reply of ``host``, met delivering to ``domain``, pauses
        this shape: always without a rule or under the domain's own rule; under a rule
        found through the domain's preferred MX hosts, only from a host of that rule. A
        backup MX elsewhere (the domain's own server, or any its owner points at) does
        not speak for the provider: heeded, its 421 paused every domain hosted there."""
        rule = self.rule
        if rule is None or host is None:
            return True
        return rule.matches(normalise_name(domain)) or rule.matches(normalise_name(host))

    def has_slot(self) -> bool:
        limit = self.max_connections
        return limit is None or self.connections < limit

    def take_local(self) -> bool:
        """Use one message token this worker holds; True without message rates."""
        if not self.message_buckets:
            return True
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False


class Shaper:
    """The rules, the pauses known to this worker, and the store calls behind them."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        store_call: StoreCall,
        clock: Callable[[], datetime],
    ) -> None:
        self._settings = config.shaping
        self._book = RuleBook.of(config.shaping)
        self._store = store
        self._store_call = store_call
        self._clock = clock
        self._by_domain: dict[str, Shape] = {}
        self._no_rule: set[str] = set()
        """Domains known to have no rule of their own (those may still match by MX)."""
        self._shapes: dict[str, Shape] = {}
        self._pauses: dict[str, DestinationThrottle] = {}
        self._stale = _STALE + 2 * config.poll_interval
        self._no_waiting = asyncio.Event()
        """Set as the worker stops: no session waits for a rate from then on."""
        max_age = config.retry.max_age
        if max_age is not None and config.shaping.pause_max >= max_age:
            # Not refused: short-lived mail (a login code) may rather fail than wait.
            log.warning(
                "shaping.pause_max (%s) is not shorter than retry.max_age (%s): a destination "
                "throttled that long fails all its pending mail as expired at once",
                config.shaping.pause_max,
                max_age,
            )

    # --- which shape ---------------------------------------------------------------------

    def _shape(self, key: str, rule: DestinationRule | None) -> Shape:
        if rule is None:
            # No limits to count: nothing to share or keep (nor a rule of hosts it left).
            self._by_domain.pop(key, None)
            return Shape(key, None)
        shape = self._shapes.get(rule.match)
        if shape is None:
            shape = self._shapes[rule.match] = Shape(rule.match, rule)
        if len(self._by_domain) >= _MAX_DOMAINS:
            self._by_domain.clear()
        self._by_domain[key] = shape
        return shape

    def known(self, domain: str) -> Shape | None:
        """The shape of ``domain`` when it is known without DNS (a rule for the domain
        itself, a rule found through its MX hosts before, or a pause on the domain)."""
        shape = self._by_domain.get(domain)
        if shape is not None:
            return shape
        if self._book and domain not in self._no_rule:
            rule = self._book.rule_for_name(domain)
            if rule is not None:
                return self._shape(domain, rule)
            if len(self._no_rule) >= _MAX_DOMAINS:
                self._no_rule.clear()
            self._no_rule.add(domain)
        if domain in self._pauses:
            return Shape(domain, None)
        return None

    def for_route(self, domain: str, hosts: Sequence[str]) -> Shape:
        """The shape of ``domain`` whose most preferred MX hosts are ``hosts`` (a backup
        MX at a provider does not make the domain the provider's). Matched again
        on each route (once a session, not per message): a domain whose MX hosts moved to
        another provider while the worker runs takes the rule of its new hosts."""
        rule = self._book.match(domain, hosts) if self._book else None
        return self._shape(domain, rule)

    # --- pauses ---------------------------------------------------------------------------

    def pause_of(self, shape: Shape) -> DestinationThrottle | None:
        """The pause holding ``shape`` back now, if any."""
        pause = self._pauses.get(shape.key)
        if pause is None:
            return None
        if not pause_runs(pause, self._clock()):  # ended, or from a clock since set back
            del self._pauses[shape.key]
            return None
        shape.tokens = 0  # taken before the pause was known (see Shape.tokens)
        return pause

    def paused(self) -> list[DestinationThrottle]:
        """The pauses this worker knows of (its own and those read from the store)."""
        now = self._clock()
        return sorted(
            (p for p in self._pauses.values() if pause_runs(p, now)), key=lambda p: p.until
        )

    async def throttled(
        self, shape: Shape, reply: str, recipients: Sequence[tuple[str, str]] = ()
    ) -> DestinationThrottle:
        """Pause ``shape`` after a throttling ``reply``: in the store, for every worker;
        in this worker alone when the store fails (the reply must be heeded anyway).
        ``recipients``: (message id, address) of those the reply deferred."""
        settings = self._settings
        now = self._clock()
        try:
            pause: DestinationThrottle = await self._store_call(
                self._store.throttle,
                shape.key,
                now=now,
                reply=reply,
                first=settings.pause_first,
                maximum=settings.pause_max,
                recipients=recipients,
            )
        except StoreError as exc:
            log.warning("could not record the pause of %s in the store: %s", shape.key, exc)
            pause = next_pause(
                self._pauses.get(shape.key),
                destination=shape.key,
                now=now,
                first=settings.pause_first,
                maximum=settings.pause_max,
                reply=reply,
            )
        known = self._pauses.get(shape.key)
        shape.tokens = 0
        if known is None or not pause_runs(known, now) or known.until < pause.until:
            self._pauses[shape.key] = pause
            log.warning(
                "destination %s throttled until %s (%d in a row): %s",
                shape.key,
                pause.until.isoformat(timespec="seconds"),
                pause.strikes,
                reply,
            )
        return self._pauses[shape.key]

    async def refresh(self) -> None:
        """Read the pauses every worker of the store recorded."""
        found: list[DestinationThrottle] = await self._store_call(
            self._store.throttles, now=self._clock()
        )
        now = self._clock()
        mine = {k: p for k, p in self._pauses.items() if pause_runs(p, now)}
        for pause in found:
            pause = bounded(pause, self._settings.pause_max)
            known = mine.get(pause.destination)
            if known is None or known.until < pause.until:
                mine[pause.destination] = pause
            shape = self._shapes.get(pause.destination)
            if shape is not None:
                shape.tokens = 0  # a shape this worker may not ask about while paused
        self._pauses = mine

    # --- rates ----------------------------------------------------------------------------

    def stop_waiting(self) -> None:
        """The worker stops: a session waiting for a rate stops waiting, and none waits
        from now on (:meth:`wait_to_send` and :meth:`wait_to_connect` say no unless a
        token is at hand). What the rate holds back is not on the wire, and the
        dispatcher gives it back (see ``Dispatcher.drain``)."""
        self._no_waiting.set()

    def rated(self) -> list[Shape]:
        """The shapes under a message rate."""
        return [shape for shape in self._shapes.values() if shape.message_buckets]

    def place(self, shape: Shape, waiting: int) -> datetime:
        """When the rate of ``shape`` (which has message rates) lets a message go that
        finds ``waiting`` others ahead of it: the next whole second after, so that mail
        given back at one go is written in a few calls."""
        rate = min(bucket.rate for bucket in shape.message_buckets)
        due = self._clock() + timedelta(seconds=min(waiting / rate, MAX_SECONDS))
        return _whole_second(due)

    def _clock_for(self, shape: Shape) -> datetime:
        """The clock's time now, for the rate of ``shape``: what this worker stamped on
        ``shape`` more than :data:`~mailstrom.policy.throttle.CLOCK_SET_BACK` ahead of it
        (its schedule, its tokens) was stamped by the clock before it was set back (a
        year ahead, corrected by NTP), and is dropped. Kept, each message given back was
        booked after the places taken a year ahead, and failed at once as expired."""
        now = self._clock()
        made = max((t for t in (shape.booked_at, shape.sent_at) if t is not None), default=now)
        if made - now > CLOCK_SET_BACK:
            shape.booked.clear()
            shape.booked_since = shape.booked_at = shape.sent_at = shape.tokens_until = None
            shape.tokens = 0  # their lapse was a year ahead (see Shape.tokens)
        return now

    async def _nap(self, seconds: float) -> None:
        """Wait ``seconds`` for a rate, cut short when the worker stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_waiting.wait(), seconds)  # a rate, not a poll

    def spread(
        self, shape: Shape, waiting: int, rank: int = 0, *, latest: datetime | None = None
    ) -> datetime | None:
        """When a message of lane ``rank`` (0 the highest) that finds ``waiting`` others
        queued ahead of it for ``shape`` should come back from the store, if its rate
        leaves it waiting past the horizon; else None. A time past ``latest`` (when the
        retry policy gives up on the message) books no place in the rate's schedule: the
        message fails instead of coming back, and must not push back those after it."""
        if not shape.message_buckets:
            return None
        rate = min(bucket.rate for bucket in shape.message_buckets)
        if waiting < max(shape.want, math.ceil(rate * _HORIZON)):
            return None
        # Each message given back books the next place in the rate's schedule, after
        # those queued here and those given back before it. However slow the rate and
        # long the queue, the schedule ends within the longest duration the queue takes
        # (100 years): a timedelta past it overflows instead of waiting.
        now = self._clock_for(shape)
        end = now + MAX_DURATION
        due = now + timedelta(seconds=min(waiting / rate, MAX_SECONDS))
        booked = max((at for lane, at in shape.booked.items() if lane <= rank), default=None)
        if booked is not None and booked > due and self._stale_schedule(shape, rate, now):
            shape.booked.clear()
            booked = None
        if booked is not None and booked > due:
            due = min(booked, end)
        # Whole seconds, so that one lease's overflow is given back in a few writes.
        at = _whole_second(due)
        if latest is None or at <= latest:
            if shape.booked_since is None or max(shape.booked.values(), default=now) <= now:
                shape.booked_since = at  # a new schedule: nothing booked is still ahead
            shape.booked[rank] = min(due + timedelta(seconds=min(1 / rate, MAX_SECONDS)), end)
            shape.booked_at = now
        return at

    def _stale_schedule(self, shape: Shape, rate: float, now: datetime) -> bool:
        """Whether ``shape``'s schedule has had mail due for longer than the mail it
        stands for takes to come back and go out, with nothing sent meanwhile."""
        since = shape.booked_since
        if since is None:
            return True
        sent = shape.sent_at
        if sent is not None and sent > since:
            since = sent
        grace = self._stale + min(shape.want / rate, MAX_SECONDS)
        return (now - since).total_seconds() > grace

    async def _take(self, buckets: Sequence[TokenBucket], want: int) -> TokenGrant:
        try:
            grant: TokenGrant = await self._store_call(
                self._store.take_tokens, buckets, want=want, now=self._clock()
            )
        except StoreError as exc:
            # No token without the store: a rate is a promise to the receiver.
            log.warning("could not take shaping tokens from the store: %s", exc)
            return TokenGrant(granted=0, wait=_STORE_RETRY)
        return grant

    def _lapse(self, shape: Shape) -> None:
        """Drop the tokens ``shape`` holds if they have lapsed (see :attr:`Shape.tokens`)."""
        if shape.booked_at is None and shape.sent_at is None and shape.tokens <= 0:
            # Nothing a rate stamped (none without message rates, each message's case):
            # no clock to read, twice per message.
            return
        now = self._clock_for(shape)
        until = shape.tokens_until
        if shape.tokens > 0 and until is not None and now >= until:
            shape.tokens = 0

    def take(self, shape: Shape) -> bool:
        """Use one message token of ``shape`` now, if it is not paused and holds one
        that has not lapsed; True without message rates.

        The lapse is looked at here too, not only in :meth:`wait_to_send`: a session
        takes its tokens before it waits for the connection rate, connects and reads a
        greeting, which may take longer than they last (a tarpit's slow greeting, a rate
        of a few connections a minute), and its messages then went out on top of the
        store's buckets, refilled meanwhile: twice the rate at once."""
        if self.pause_of(shape) is not None:
            return False
        self._lapse(shape)
        return shape.take_local()

    async def wait_to_send(self, shape: Shape) -> bool:
        """Wait until ``shape`` may send a message; False when it is paused (now or
        meanwhile), or when the worker stops (:meth:`stop_waiting`) and no token is at
        hand. Without message rates this returns at once."""
        while True:
            if self.pause_of(shape) is not None:
                return False
            self._lapse(shape)
            if not shape.message_buckets or shape.tokens > 0:
                return True
            if self._no_waiting.is_set():
                return False
            grant = await self._take(shape.message_buckets, shape.want)
            if grant.granted:
                shape.tokens += grant.granted
                rate = min(bucket.rate for bucket in shape.message_buckets)
                lasts = min(grant.granted / rate, MAX_SECONDS)
                shape.sent_at = self._clock()
                shape.tokens_until = shape.sent_at + timedelta(seconds=lasts)
                continue
            # Look at the pauses again at least every refresh interval while waiting.
            await self._nap(min(grant.wait, self._settings.refresh))

    async def wait_to_connect(self, shape: Shape) -> bool:
        """Wait until ``shape`` may open a new connection; False when it is paused, or
        when the worker stops (:meth:`stop_waiting`)."""
        while True:
            if self.pause_of(shape) is not None:
                return False
            if not shape.connect_buckets:
                return True
            if self._no_waiting.is_set():
                return False
            grant = await self._take(shape.connect_buckets, 1)
            if grant.granted:
                return self.pause_of(shape) is None
            await self._nap(min(grant.wait, self._settings.refresh))


def _whole_second(due: datetime) -> datetime:
    """The whole second after ``due``."""
    return due.replace(microsecond=0) + timedelta(seconds=1)
