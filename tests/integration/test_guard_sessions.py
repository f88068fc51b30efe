"""Sessions at the broker's edge: no connection takes over or disturbs another's session.

Real broker on 127.0.0.1, real clients, raw ZeroMQ peers for the hostile side.
"""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from tests.conftest import wait_for
from zchat import protocol as p

SECRET = "raw-peer-secret-0123456789abcdef"


class Raw:
    """A hand-driven ZeroMQ peer with PLAIN credentials; ``source`` picks the local address."""

    def __init__(
        self, endpoint: str, name: str, secret: str = SECRET, *, kind: int = zmq.DEALER,
        routing_id: bytes | None = None, source: str | None = None,
    ) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(kind)
        self.sock.linger = 0
        self.sock.plain_username = name.encode()
        self.sock.plain_password = secret.encode()
        if routing_id is not None:
            self.sock.routing_id = routing_id
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED
        )
        self.events: list[int] = []
        host_port = endpoint.removeprefix("tcp://")
        self.sock.connect(f"tcp://{source}:0;{host_port}" if source else endpoint)

    async def handshake(self, timeout: float = 10.0) -> int:
        """The first handshake outcome: EVENT_HANDSHAKE_SUCCEEDED or _FAILED_AUTH (or DISCONNECTED)."""
        event = parse_monitor_message(await asyncio.wait_for(self.monitor.recv_multipart(), timeout))
        self.events.append(event["event"])
        return event["event"]

    async def request(self, body: object, timeout: float = 5.0) -> object:
        await self.sock.send(p.encode(body))
        return p.decode_reply(await asyncio.wait_for(self.sock.recv(), timeout))

    async def pending(self) -> int:
        """Whether a message is waiting to be read right now (no wait)."""
        return await self.sock.poll(0)

    def close(self) -> None:
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


async def test_a_session_id_used_by_another_user_takes_nothing_over(connect, broker) -> None:
    """fails on main (router_handover=1): the thief's DEALER took alice's route, so her
    ack and pong went to the thief and alice timed out."""
    alice = await connect("alice")
    await alice.join("general")
    assert (await alice.send("general", "before")).seq >= 1
    thief = Raw(broker.endpoint, "mallory", routing_id=alice.sid.encode())
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
    first = Raw(broker.endpoint, "bob", routing_id=sid)
    assert await first.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
    assert isinstance(await first.request(p.Hello(rid=1, client="raw")), p.Welcome)
    guard = broker.broker.guard
    await wait_for(lambda: guard.count("127.0.0.1", "requests") == 1, what="the broker to count bob's connection")
    first.close()
    await wait_for(lambda: guard.count("127.0.0.1", "requests") == 0, what="the broker to see the connection end")
    again = Raw(broker.endpoint, "bob", routing_id=sid)
    try:
        assert await again.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert isinstance(await again.request(p.Ping(rid=2)), p.Pong)
    finally:
        again.close()
