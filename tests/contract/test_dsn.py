"""Contract: a message's DSN request (RFC 3461) is stored and handed out with its work."""

from __future__ import annotations

from dataclasses import replace

from mailstrom.message.dsn import DSN, Notify, Return
from mailstrom.stores import Store

from .support import NOW, lease_all, message


def test_the_dsn_request_comes_back_with_the_lease(store: Store) -> None:
    dsn = DSN(notify=(Notify.FAILURE, Notify.DELAY), ret=Return.HEADERS, envid="order;42=x")
    asked = store.enqueue(replace(message("a@example.org"), dsn=dsn), now=NOW)
    plain = store.enqueue_many([message("b@example.net")], now=NOW)[0]
    items = {item.message_id: item for item in lease_all(store).items}
    assert items[asked].dsn == dsn
    assert items[plain].dsn is None
