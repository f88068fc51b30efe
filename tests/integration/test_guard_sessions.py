"""Sessions at the broker's edge: no connection takes over or disturbs another's session.

Real CURVE broker on 127.0.0.1, real clients, raw ZeroMQ peers for the hostile side
(with the keypair of a name they claimed: authenticated attackers).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq

from tests.conftest import HEARTBEAT, RunningBroker, wait_for
from tests.integration.raw import SECRET, Raw, claim
from zchat import protocol as p
from zchat.core import Limits


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[RunningBroker]:
    """A CURVE broker (the `connect` fixture's clients pin it on loopback)."""
    running = await RunningBroker(tmp_path / "history.db", Limits(heartbeat=HEARTBEAT, rate=0), secure=True, key_dir=tmp_path).start()
    yield running
    await running.stop()


async def named(broker: RunningBroker, name: str, **kw: object) -> Raw:
    """A raw peer with the keypair of a name it has claimed: an authenticated attacker."""
    server_key = broker.broker.public_key  # type: ignore[union-attr]
    assert await claim(broker.endpoint, name, SECRET, server_key) == zmq.EVENT_HANDSHAKE_SUCCEEDED
    return Raw(broker.endpoint, name, SECRET, server_key=server_key, **kw)  # type: ignore[arg-type]


async def test_a_session_id_used_by_another_user_takes_nothing_over(connect, broker) -> None:
    """fails on main (router_handover=1): the thief's DEALER took alice's route, so her
    ack and pong went to the thief and alice timed out."""
    alice = await connect("alice")
    await alice.join("general")
    assert (await alice.send("general", "before")).seq >= 1
    thief = await named(broker, "mallory", routing_id=alice.sid.encode())
    try:
        assert await thief.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        for rid, body in ((1, p.Hello(rid=1, client="thief")), (2, p.Ping(rid=2)), (3, p.Who(rid=3, room="general"))):
            await thief.sock.send(p.encode(body))
        # The victim keeps working while the thief's connection stays up and has sent.
        for i in range(3):
            stored = await asyncio.wait_for(alice.send("general", f"still mine {i}"), 5)
            assert stored.room == "general"
            await asyncio.wait_for(alice.ping(), 5)
        assert alice.state == "connected"
        assert broker.core.sessions[alice.sid].name == "alice"
        # alice's last pong came after all the thief's frames: anything the broker had
        # for the thief would have been sent before it.
        assert await thief.pending() == 0, "the thief got a reply on alice's session id"
    finally:
        thief.close()
    # and after the thief has gone
    await asyncio.wait_for(alice.send("general", "after"), 5)


async def test_a_reconnect_with_the_same_session_id_works_once_the_old_pipe_is_gone(broker) -> None:
    """A client's DEALER that reconnects after its old connection ended keeps its session."""
    sid = b"feedface00000001"
    first = await named(broker, "bob", routing_id=sid)
    assert await first.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
    assert isinstance(await first.request(p.Hello(rid=1, client="raw")), p.Welcome)
    guard = broker.broker.guard
    await wait_for(lambda: guard.count("127.0.0.1", "requests") >= 1, what="the broker to count bob's connection")
    first.close()
    await wait_for(lambda: guard.count("127.0.0.1", "requests") == 0, what="the broker to see the connection end")
    again = Raw(broker.endpoint, "bob", SECRET, routing_id=sid, server_key=broker.broker.public_key)
    try:
        assert await again.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert isinstance(await again.request(p.Ping(rid=2)), p.Pong)
    finally:
        again.close()
