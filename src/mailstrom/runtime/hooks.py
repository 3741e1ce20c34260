"""The hook sender: events from the store's outbox POSTed to ``Config.hook``, in batches.

It runs as a task on the worker's loop. Each turn it leases a batch of unsent events
(oldest first; other workers' senders never get the same ones), POSTs them signed
(:mod:`mailstrom.webhooks`) and marks them sent once the endpoint answers 2xx. Up to
``hook.concurrency`` (4) requests are in flight at once, each with a batch of its own, so
an endpoint that takes 50 ms to answer is not held to 20 requests a second while the
outbox grows: batches are leased, and their requests started, in id order, but requests
in flight together may be answered in any order (receivers keep the highest id per
recipient; ``hook.concurrency = 1`` sends one at a time, in order). A failed request (an
error status, a redirect, a timeout, no connection) gives the batch back; once the others
in flight have ended the sender waits, doubling the wait from ``hook.retry_min`` (1 s) up
to ``retry_max`` (5 min), or longer when the endpoint's ``Retry-After`` asks for longer
(``retry_max`` at most), and sends one request at a time until one succeeds, so an
endpoint that is down gets no more requests than from a sender of one. The events wait in
the store, so an endpoint that is down loses nothing and a restart resends exactly the
events that were never acknowledged. A sender killed between the POST and the
acknowledgement leaves that batch leased until ``lease_for`` passes, then it is sent again:
at-least-once, which is why each event carries an id to de-duplicate on. A sender that
cannot mark a batch sent (the store locked, or unreachable) tries that again, with backoff,
before it leases anything else: the endpoint has the batch, and leasing on would POST the
next events first and the batch again once its lease ran out. So does one that cannot give
a failed batch back: the next lease would skip it, and the events after it go first.

A 413 (Content Too Large) without ``Retry-After`` (with one, the endpoint says the
condition is temporary: a failure like any other) is no failure to wait out: the same
batch would be refused for ever, and no event after it sent. The batch goes back and the
sender leases half as many events at once (down to one). It grows back with each batch the
endpoint takes, by doubling, but not to the number of events refused: for
:data:`TOO_LARGE_FOR` (an hour) it grows halfway towards that number at a time, so that an
endpoint whose limit lies between a batch and its half gets a few 413s while the sender
finds it, not one every other request. Past that hour full batches are tried again (the
endpoint's limit may have been raised, or the events that were too many be smaller).
An event refused on its own can never be sent: it is given up (marked sent, with an error
in the log naming it) and the sender goes on with the next; a mark the store fails is
tried again first, as a sent batch's is (the endpoint's answer was final).

HTTP goes through the standard library (``urllib.request``) on a thread: one request per
batch of up to ``hook.batch`` events makes the thread hand-off and the missing connection
reuse negligible, it verifies TLS certificates with the system's trust store by default,
and it needs no extra to install. Redirects are not followed (a hook URL that moved is a
configuration error, and following one would resend the body somewhere else). Each request
ends within ``hook.timeout`` whatever the endpoint sends (:mod:`.hook_post`), so an endpoint
that answers slowly only fails its requests; it cannot hold up the sender or a stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from mailstrom._version import __version__
from mailstrom.config import HookConfig, shown_hook_url
from mailstrom.errors import StoreError
from mailstrom.runtime.hook_post import HTTPFailure, post
from mailstrom.runtime.metrics import MetricsRecorder
from mailstrom.stores.base import EventBatch, Store
from mailstrom.webhooks import SIGNATURE_HEADER, encode_events, sign

log = logging.getLogger("mailstrom.hooks")

T = TypeVar("T")
StoreCall = Callable[..., Awaitable[Any]]

RETENTION = timedelta(hours=24)
"""How long sent events stay in the outbox (for ``mailstrom events``) before pruning."""
PRUNE_EVERY = 600.0
"""Seconds between prunes."""


TOO_LARGE = 413
"""The status of an endpoint that takes no body this large (RFC 9110 §15.5.14)."""

TOO_LARGE_FOR = timedelta(hours=1)
"""How long a number of events the endpoint refused as too large (413) bounds the batch."""

POST_GRACE = 1.0
"""Seconds the sender waits for a request past ``hook.timeout`` before counting it failed
(the name lookup is the one step :func:`post` cannot cut short)."""


async def post_off_loop(
    url: str, body: bytes, headers: dict[str, str], timeout: float
) -> str | None:
    """:func:`post` on a daemon thread of its own; its failure, or why it took too long.

    Not ``asyncio.to_thread``: the loop's default executor is joined when the loop closes,
    so a request stuck there would hold up the worker's exit.
    """
    done: concurrent.futures.Future[str | None] = concurrent.futures.Future()

    def request() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(post(url, body, headers, timeout))
        except BaseException as exc:  # handed to the awaiting task
            done.set_exception(exc)

    threading.Thread(target=request, name="mailstrom-hook-post", daemon=True).start()
    within = timeout + POST_GRACE
    try:
        return await asyncio.wait_for(asyncio.wrap_future(done), within)
    except TimeoutError:
        return f"no answer within {within:g} s"


class HookSender:
    """Sends the outbox of ``store`` to ``hook`` until :meth:`stop`.

    ``store_call`` runs a store method the way the worker does (on the loop for local
    stores, in a thread for PostgreSQL); ``clock`` gives aware UTC times.
    """

    def __init__(
        self,
        hook: HookConfig,
        store: Store,
        *,
        store_call: StoreCall,
        clock: Callable[[], datetime],
        metrics: MetricsRecorder,
        poll_interval: float,
        rng: random.Random | None = None,
    ) -> None:
        self._hook = hook
        self._shown_url = shown_hook_url(hook.url)
        """The URL as log lines show it: its origin (credentials in its path or query
        are not for them)."""
        self._store = store
        self._store_call = store_call
        self._clock = clock
        self._metrics = metrics
        self._poll = poll_interval
        self._rng = rng or random.Random()
        # Long enough for a request that takes its whole timeout, and a little more.
        self.lease_for = timedelta(seconds=2 * hook.timeout + 1)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._deadline = float("inf")
        self._failing = False
        self._limit = hook.batch
        """Events leased at once: less than ``hook.batch`` after a 413."""
        self._refused: tuple[int, datetime] | None = None
        """The fewest events the endpoint refused at once as too large (413), and when:
        for :data:`TOO_LARGE_FOR`, the batch grows back only below that number."""
        self._last_prune = -PRUNE_EVERY
        self._unacked: list[tuple[EventBatch, bool]] = []
        """Batches the endpoint answered for good (took them, or refused one event alone as
        too large) that could not be marked sent yet; with each, whether it is an event
        given up (not counted as sent)."""
        self._unreleased: list[EventBatch] = []
        """Batches the endpoint did not take that could not be given back yet."""
        self._retry_after: float | None = None
        """Seconds the endpoint's failed answers since the last wait asked to wait at
        most (``Retry-After``)."""

    def wake(self) -> None:
        """New events may be in the outbox (called on the loop)."""
        self._wake.set()

    def stop(self, within: float) -> None:
        """Send what is in the outbox for at most ``within`` seconds more, then end: the
        batches in flight are finished and acknowledged rather than left to expire."""
        self._stopping = True
        self._deadline = time.monotonic() + within
        self._wake.set()
        self._stop.set()

    async def run(self) -> None:
        sending: set[asyncio.Task[bool]] = set()
        try:
            wait = self._hook.retry_min
            longest = timedelta(seconds=self._hook.retry_max)
            while True:
                started = self._clock()
                try:
                    await self._lease_and_send(sending)
                    break
                except Exception:
                    # A bug, or no thread to be had for a store call: the task ended on
                    # it, unwatched and saying nothing, and every event after it stayed
                    # in the outbox while the worker went on delivering. As for a
                    # request (_send_batch): said, counted, and waited out.
                    log.exception("hook: the sender failed; going on with backoff")
                    self._metrics.hook_failures += 1
                    if self._stopping:
                        break
                    if self._clock() - started > longest:
                        # It ran well for longer than the longest wait since the last
                        # failure: a new failure, not the same one again, waited as a first.
                        wait = self._hook.retry_min
                    wait = await self._back_off(wait)
            # The requests in flight end within hook.timeout (and POST_GRACE), and are
            # acknowledged: left, their events would go again once their lease ran out.
            if sending:
                await asyncio.wait(sending)
            if self._unacked:
                await self._ack_again()
        finally:
            for task in sending:
                task.cancel()  # only when this task was cancelled: a stop that ran out
            await asyncio.gather(*sending, return_exceptions=True)

    def _slots(self) -> int:
        """Requests in flight at most: ``hook.concurrency``, or one (a probe) while the
        endpoint fails, so that one that is down gets no more requests than before."""
        return 1 if self._failing else self._hook.concurrency

    async def _lease_and_send(self, sending: set[asyncio.Task[bool]]) -> None:
        """Lease batches and start a request for each, up to :meth:`_slots` at once, until
        a stop; ``sending`` holds the requests in flight. Batches are leased (and their
        requests started) oldest first, so a request's events are oldest first; requests
        in flight together may be answered in any order (see ``docs/guide.md``)."""
        wait = self._hook.retry_min
        while True:
            ended = [task for task in sending if task.done()]
            if ended:
                sending.difference_update(ended)
                if all(task.result() for task in ended):
                    wait = self._hook.retry_min
                else:
                    if self._stopping:
                        return
                    # The endpoint (or the store) fails: what is in flight ends first, and
                    # the wait is counted once for all of them.
                    if sending:
                        await asyncio.wait(sending)
                        sending.clear()
                    wait = await self._back_off(wait)
                    continue
            if self._unacked:
                # Before anything else, a stop included: the endpoint has these events.
                if not await self._ack_again():
                    if self._stopping:
                        return
                    wait = await self._back_off(wait)
                    continue
                wait = self._hook.retry_min
            # Leased on, the next events would go first, and these only once their lease
            # ran out: a recipient's earlier state after its later one.
            if self._unreleased and not self._stopping and not await self._release_again():
                wait = await self._back_off(wait)
                continue
            if self._stopping and (self._failing or time.monotonic() >= self._deadline):
                return
            if len(sending) >= self._slots():
                await asyncio.wait(sending, return_when=asyncio.FIRST_COMPLETED)
                continue
            # Every turn, not only when the outbox is empty: with an endpoint failing, or
            # events coming faster than they go, it may never be (at most every PRUNE_EVERY).
            await self._prune()
            self._wake.clear()  # a record from now on wakes the idle wait below
            try:
                batch = await self._store_call(
                    self._store.lease_events,
                    now=self._clock(),
                    limit=self._limit,
                    lease_for=self.lease_for,
                )
            except StoreError as exc:
                log.warning("hook: cannot read the outbox: %s", exc)
                if self._stopping:
                    return
                wait = await self._back_off(wait)
                continue
            if batch is None:
                if self._stopping:
                    return
                await self._idle(sending)
                continue
            sending.add(asyncio.create_task(self._send_batch(batch), name="mailstrom-hook-post"))

    async def _idle(self, sending: set[asyncio.Task[bool]]) -> None:
        """Wait for new events (a wake-up, or the poll interval) or a request's end."""
        if not sending:
            await self._sleep(self._poll, self._wake)
            return
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait(
                {woken, *sending}, timeout=self._poll, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            woken.cancel()

    async def _send_batch(self, batch: EventBatch) -> bool:
        """:meth:`_send`, and False for whatever a bug raises there: the sender goes on
        (with backoff), as ended it would leave events piling up unsent with nothing said."""
        try:
            return await self._send(batch)
        except Exception:
            log.exception("hook: sending a batch failed")
            self._metrics.hook_failures += 1
            return False

    async def _back_off(self, wait: float) -> float:
        """Wait about ``wait`` seconds (±20 %), or as long as the longest ``Retry-After``
        since the last wait asked if that is longer (``retry_max`` at most), or until a stop;
        the next wait, doubled up to ``retry_max``. New events do not cut it short (the
        endpoint or the store is failing); a stop does."""
        pause = wait * self._rng.uniform(0.8, 1.2)
        asked, self._retry_after = self._retry_after, None
        if asked is not None:
            pause = max(pause, min(asked, self._hook.retry_max))
        await self._sleep(pause, self._stop)
        return min(wait * 2, self._hook.retry_max)

    async def _send(self, batch: EventBatch) -> bool:
        body = encode_events(batch.events)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"mailstrom/{__version__}",
            SIGNATURE_HEADER: sign(self._hook.secret, body),
        }
        failure = await post_off_loop(self._hook.url, body, headers, self._hook.timeout)
        asked = failure.retry_after if isinstance(failure, HTTPFailure) else None
        if isinstance(failure, HTTPFailure) and failure.status == TOO_LARGE and asked is None:
            # With Retry-After, the condition is temporary (RFC 9110 §15.5.14): a failure
            # to wait out as any other, not a batch too large for good.
            return await self._too_large(batch, len(body))
        if failure is None:
            if not await self._ack(batch):
                return False
            self._limit = self._grown()
            if self._failing:
                log.warning("hook: %s answers again", self._shown_url)
            self._failing = False
            return True
        self._metrics.hook_failures += 1
        if not self._failing:
            log.warning(
                "hook: POST to %s failed (%s); retrying with backoff",
                self._shown_url,
                failure,  # post() shows no more of the URL than _shown_url does
            )
        self._failing = True
        if asked is not None:
            # The longest any failed request asked for: one beside it that fails later
            # without Retry-After (a 503, a reset) is no leave to come back sooner.
            self._retry_after = max(asked, self._retry_after or 0.0)
        await self._release(batch)
        return False

    def _grown(self) -> int:
        """The batch after one the endpoint took: twice as large (``hook.batch`` at most),
        or, while a number of events refused as too large is remembered, halfway towards
        it. Doubling back to that number had the endpoint refuse every other batch when
        its limit lay between it and its half."""
        if self._refused is not None:
            refused, at = self._refused
            if self._recent(at, self._clock()):
                return max(self._limit, (self._limit + refused) // 2)
            self._refused = None  # an hour on (or the clock set back): try full batches
        return min(self._limit * 2, self._hook.batch)

    @staticmethod
    def _recent(refused_at: datetime, now: datetime) -> bool:
        """Whether a 413 at ``refused_at`` still bounds the batch (:data:`TOO_LARGE_FOR`)."""
        return timedelta(0) <= now - refused_at < TOO_LARGE_FOR

    async def _ack(self, batch: EventBatch, *, given_up: bool = False) -> bool:
        """Mark ``batch``, which the endpoint took (or, ``given_up``, refused for good),
        sent; False when the store failed: it is kept to try again (see
        :meth:`_lease_and_send`), not sent again."""
        try:
            acked = await self._store_call(self._store.ack_events, batch, now=self._clock())
        except StoreError as exc:
            if not any(kept is batch for kept, _ in self._unacked):
                if given_up:
                    log.warning(
                        "hook: cannot mark event %d given up yet: %s", batch.events[0].id, exc
                    )
                else:
                    log.warning(
                        "hook: sent %d events, cannot mark them sent yet: %s",
                        len(batch.events),
                        exc,
                    )
                self._unacked.append((batch, given_up))
            return False
        # Those still under the batch's lease: if it ran out and another sender took them,
        # that one sends them again (at least once).
        self._unacked = [kept for kept in self._unacked if kept[0] is not batch]
        if not given_up:
            self._metrics.hook_events_sent += acked
        return True

    async def _ack_again(self) -> bool:
        """Mark the batches kept by :meth:`_ack` sent; False at the first the store fails."""
        for batch, given_up in list(self._unacked):
            if not await self._ack(batch, given_up=given_up):
                return False
        return True

    async def _release(self, batch: EventBatch) -> bool:
        """Give ``batch`` back to the outbox; False when the store failed: it is kept to
        try again before the next lease (see :meth:`_lease_and_send`), or left to expire
        at a stop."""
        try:
            await self._store_call(self._store.release_events, batch)
        except StoreError as exc:
            if not any(kept is batch for kept in self._unreleased):
                log.debug("hook: cannot give %d events back yet: %s", len(batch.events), exc)
                self._unreleased.append(batch)
            return False
        self._unreleased = [kept for kept in self._unreleased if kept is not batch]
        return True

    async def _release_again(self) -> bool:
        """Give the batches kept by :meth:`_release` back; False at the first that fails."""
        for batch in list(self._unreleased):
            if not await self._release(batch):
                return False
        return True

    async def _too_large(self, batch: EventBatch, size: int) -> bool:
        """The endpoint answered 413 to ``batch`` (``size`` bytes): fewer events at once,
        or, for one event alone, give it up. True: the sender goes on at once."""
        self._metrics.hook_failures += 1
        count = len(batch.events)
        if count > 1:
            # The fewest refused, and the smallest batch: a request in flight beside this
            # one was leased before it, with as many events or more.
            self._limit = min(self._limit, max(1, count // 2))
            now, refused = self._clock(), self._refused
            if refused is None or count < refused[0] or not self._recent(refused[1], now):
                self._refused = (count, now)
            log.info(
                "hook: %s refused %d events (%d bytes) as too large; sending %d at a time",
                self._shown_url,
                count,
                size,
                self._limit,
            )
            await self._release(batch)  # tried again first if it fails (see run)
            return True
        event = batch.events[0]
        log.error(
            "hook: %s refused event %d alone (%s for %s, %d bytes) as too large; "
            "it is given up, not sent",
            self._shown_url,
            event.id,
            event.state.value,
            event.address,
            size,
        )
        # Left leased, the event went again (and was refused again) once the lease ran out.
        return await self._ack(batch, given_up=True)

    async def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = now
        try:
            await self._store_call(self._store.prune_events, sent_before=self._clock() - RETENTION)
        except StoreError as exc:
            log.debug("hook: pruning sent events failed: %s", exc)

    @staticmethod
    async def _sleep(seconds: float, until: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), timeout=seconds)
