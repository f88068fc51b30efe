"""A client whose connection goes silent without closing (a network that drops packets,
a NAT that forgets) starts over as a new session: the broker holds the old route (and
takes no second connection with that routing id), and the old TCP connection would
never tell the DEALER anything."""

from __future__ import annotations

import asyncio

from zchat import keys
from zchat.client import Client

from tests.conftest import RunningBroker, chat


class FreezingProxy:
    """TCP 127.0.0.1:port -> target. ``freeze()`` stops forwarding on the connections open
    now, which stay open; connections made after it go through."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.generation = 0
        self.frozen_before = 0
        self.thaw = asyncio.Event()  # never set: a frozen connection stays frozen
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> "FreezingProxy":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def freeze(self) -> None:
        self.frozen_before = self.generation + 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.generation += 1
        mine = self.generation
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while True:
                data = await src.read(65536)
                if mine < self.frozen_before:
                    await self.thaw.wait()  # hold it: nothing passes, nothing closes
                if not data:
                    dst.close()
                    return
                dst.write(data)
                await dst.drain()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.close()


async def test_a_connection_gone_silent_is_replaced_by_a_new_session(broker: RunningBroker, connect) -> None:
    proxy = await FreezingProxy(broker.broker.ports[0]).start()  # type: ignore[union-attr]
    keys.declare_insecure(f"tcp://127.0.0.1:{proxy.port}")  # it stands for the test-only plaintext broker
    alice = Client(f"tcp://127.0.0.1:{proxy.port}", "alice", "secret-of-alice-0123456789", ack_timeout=1.0)
    try:
        await alice.connect()
        bob = await connect("bob")
        await alice.join("dev")
        await bob.join("dev")
        await alice.send("dev", "before")
        old_sid = alice.sid
        proxy.freeze()
        pending = alice.post("dev", "while the network was gone")  # queued into the dead connection
        stored = await asyncio.wait_for(pending, 30)
        assert alice.sid != old_sid and alice.state == "connected"
        await alice.send("dev", "after")
        got = await chat(bob, 3, timeout=15)
        assert [m.text for m in got] == ["before", "while the network was gone", "after"]
        assert stored.seq == got[1].seq
        history = [m.text for m in await bob.history("dev", 10) if m.kind == "text"]
        assert history == ["before", "while the network was gone", "after"]  # once each
    finally:
        await alice.close()
        await proxy.close()
        keys.undeclare_insecure(f"tcp://127.0.0.1:{proxy.port}")
