"""Raw ZeroMQ peers for the hostile side of tests: they speak the wire by hand.

A ``Raw`` peer speaks CURVE to a CURVE broker (give ``server_key``): with the key the
reference client would derive for ``name`` and ``secret`` (a claimed name's keypair, an
authenticated attacker), or with a throwaway keypair (``name=None``: an attacker that
never claims, a look-only session). Without ``server_key`` it speaks PLAIN, for the few
tests that need a plaintext control to be able to fail.
"""

from __future__ import annotations

import asyncio
import secrets

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from zchat import keys
from zchat import protocol as p
from zchat.sockio import close_monitored

SECRET = "raw-peer-secret-0123456789abcdef"
EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_DISCONNECTED
)


class Raw:
    """A hand-driven ZeroMQ peer; ``source`` picks the local address it connects from."""

    def __init__(
        self, endpoint: str, name: str | None, secret: str = SECRET, *, kind: int = zmq.DEALER,
        routing_id: bytes | None = None, source: str | None = None, server_key: bytes | None = None,
    ) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(kind)
        self.sock.linger = 0
        if server_key is not None:
            public, secret_key = keys.keypair_from_secret(secret, name) if name else keys.throwaway_keypair()
            self.public_key = public
            self.sock.curve_serverkey = server_key
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret_key
        else:
            self.sock.plain_username = (name or p.LOOKER).encode()
            self.sock.plain_password = secret.encode()
        if routing_id is not None:
            self.sock.routing_id = routing_id
        self.monitor = self.sock.get_monitor_socket(EVENTS, addr=f"inproc://raw-monitor-{secrets.token_hex(8)}")
        self.events: list[int] = []
        host_port = endpoint.removeprefix("tcp://")
        self.sock.connect(f"tcp://{source}:0;{host_port}" if source else endpoint)

    async def handshake(self, timeout: float = 10.0) -> int:
        """The next handshake outcome: EVENT_HANDSHAKE_SUCCEEDED or _FAILED_AUTH (or DISCONNECTED)."""
        return await self.next_event(timeout)

    async def next_event(self, timeout: float = 10.0) -> int:
        event = parse_monitor_message(await asyncio.wait_for(self.monitor.recv_multipart(), timeout))
        self.events.append(event["event"])
        return int(event["event"])

    async def wait_event(self, wanted: int, timeout: float = 10.0) -> None:
        """Wait until the monitor reports ``wanted`` (other events are recorded on the way)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while wanted not in self.events:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"no monitor event {wanted:#x}; saw {[hex(e) for e in self.events]}")
            await self.next_event(left)

    async def request(self, body: object, timeout: float = 5.0) -> object:
        await self.sock.send(p.encode(body))
        return p.decode_reply(await asyncio.wait_for(self.sock.recv(), timeout))

    async def pending(self) -> int:
        """Whether a message is waiting to be read right now (no wait)."""
        return await self.sock.poll(0)

    def close(self) -> None:
        close_monitored(self.sock, self.monitor)


async def claim(
    endpoint: str, name: str, secret: str, server_key: bytes, *, source: str | None = None, invite: str = "",
) -> int:
    """Claim ``name`` for the key of (name, secret) as the reference client does, but
    never say hello: ask on the look-only connection, then dial again; return that
    handshake's verdict (EVENT_HANDSHAKE_SUCCEEDED: the name is the key's now). A key
    that owns ``name`` already is named at once: SUCCEEDED without a second dial."""
    first = Raw(endpoint, name, secret, source=source, server_key=server_key)
    try:
        event = await first.handshake()
        if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return event
        reply = await first.request(p.Claim(rid=1, name=name, invite=invite))
        if isinstance(reply, p.Error) and reply.code == p.ErrorCode.BAD_REQUEST and "owns a name" in reply.message:
            return event
        assert isinstance(reply, p.Ok), reply
    finally:
        first.close()
    second = Raw(endpoint, name, secret, source=source, server_key=server_key)
    try:
        return await second.handshake()
    finally:
        second.close()
