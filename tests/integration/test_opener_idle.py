"""The opener's cache of idle connections, against a scripted loopback peer: what it keeps
for reuse, and that it keeps nothing for connections gone."""

from __future__ import annotations

from mailstrom import Config
from mailstrom.runtime.opener import Opener
from mailstrom.tls.requirement import PolicySource, TLSMode, TLSRequirement
from tests.integration.test_hostile_peers import peer, session

PLAIN = TLSRequirement(mode=TLSMode.NONE, source=PolicySource.DEFAULT)


async def test_a_connection_taken_for_reuse_leaves_no_key_behind() -> None:
    """Each host whose connection was reused once and then closed (its message cap, a
    break) left an empty list under its key: a worker sending to many hosts kept one
    per host, its address and TLS mode for as long as it ran, and went through them all
    at every prune."""
    async with peer(session()) as port:
        opener = Opener(Config(helo_name="client.test", smtp_port=port, allow_loopback=True))
        try:
            for i in range(3):
                host = f"mx{i}.test"
                key = opener.key(host, "127.0.0.1", PLAIN)
                conn = await opener.open(host, "127.0.0.1", PLAIN)
                opener.release(key, conn)
                assert opener.idle_count == 1
                assert opener.idle(key) is conn
                opener.close_later(conn)
                assert opener.idle_count == 0
                assert opener.idle(key) is None
            assert opener._idle == {}
        finally:
            await opener.close()
