"""What a worker needs for TLS reports (RFC 8460) and MTA-STS, built from its config.

One :class:`~mailstrom.tlsrpt.recorder.SessionRecorder` holds every counter, whoever
counts: the MTA-STS source (policy failures, sessions under its policies) and the
:class:`~mailstrom.tlsrpt.observer.SessionObserver` the engine tells about each
connection. Recording is on with ``Config.records_tls_sessions`` (``tlsrpt.record``, or
MTA-STS with ``report``), with or without MTA-STS.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

from mailstrom.config import Config
from mailstrom.runtime.dispatch import TLSObserver
from mailstrom.stores.base import Store

if TYPE_CHECKING:
    # Loaded by tls_reporting() only for the features the config turns on: a worker
    # without MTA-STS or TLS reporting imports neither package.
    from mailstrom.errors import TemporaryFailure
    from mailstrom.mtasts.hook import MTASTSHook
    from mailstrom.mtasts.source import StoreCall
    from mailstrom.tls.decide import Destination
    from mailstrom.tlsrpt.recorder import SessionRecorder


class TLSReporting(NamedTuple):
    mta_sts: MTASTSHook | None
    """The MTA-STS policy source, when ``config.mta_sts`` is set."""
    recorder: SessionRecorder | None
    """The session counters to write to the store in batches, when recording is on."""
    observe: TLSObserver | None
    """What the engine tells about each connection, when recording is on."""
    dane_failed: Callable[[Destination, TemporaryFailure], None] | None
    """What DANE tells about each host whose TLSA lookup failed, or that ``dane-only``
    refused for want of usable TLSA records (no connection is made), when recording is
    on."""


def tls_reporting(
    config: Config,
    store: Store,
    *,
    store_call: StoreCall,
    clock: Callable[[], datetime],
) -> TLSReporting:
    """The MTA-STS source and TLS session counting a worker runs with. Raises
    :class:`~mailstrom.errors.ConfigError` when MTA-STS is on and httpx is missing."""
    recorder = None
    if config.records_tls_sessions:
        from mailstrom.tlsrpt.recorder import SessionRecorder

        recorder = SessionRecorder(
            store, clock=clock, store_call=store_call, sending_ip=config.source_address or ""
        )
    hook = None
    if config.mta_sts is not None:
        from mailstrom.mtasts.hook import for_worker

        hook = for_worker(config, store, recorder, store_call=store_call, clock=clock)
    if recorder is None:
        return TLSReporting(hook, None, None, None)
    from mailstrom.tlsrpt.observer import SessionObserver

    observer = SessionObserver(recorder, mta_sts=hook)
    return TLSReporting(hook, recorder, observer, observer.dane_failed)
