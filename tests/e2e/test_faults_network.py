"""Faults at load: a flaky network between the clients and the broker.

A TCP relay (asyncio, in the test) sits on both ports a client uses: the broker binds
127.0.0.2:P (ROUTER) and P+2 (PUB); the relay listens on 127.0.0.1:P and P+2 and
forwards there. The client derives its SUB address from the host it dialled and the
Welcome's pub_port (P+2), so both of its connections go through the relay. For 60 s
under traffic the relay delays chunks, stalls a direction (some stalls outlast three
pings, so the client gives up on the connection and dials a new session) and cuts
connections (RST), at random from a fixed seed. Then the network heals and every
reader must hold every acked line exactly once, in seq order, with no gap.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import time
from pathlib import Path

from tests.conftest import HEARTBEAT, RunningBroker, free_port_base, wait_for
from zchat import keys
from zchat import protocol as p
from zchat.client import Client, ClientError, Gap, StateChange
from zchat.core import Limits

SEED = 14
CHAOS = 60.0  # seconds of flaky network under traffic
SENDERS, READERS, PAUSE = 6, 3, 0.1  # each sender: one line in flight, then PAUSE
ROOM = "flaky"


class FlakyRelay:
    """Forwards 127.0.0.1:port -> target:port for each port; while ``chaos`` is set it
    delays chunks, stalls a direction and cuts whole connections, drawing from one
    seeded Random (the order of draws follows the traffic, so runs differ in detail)."""

    def __init__(self, target: str, ports: list[int], seed: int) -> None:
        self.target, self.ports = target, ports
        self.rng = random.Random(seed)
        self.chaos = False
        self.servers: list[asyncio.AbstractServer] = []
        self.links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.tasks: set[asyncio.Task] = set()
        self.counts: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        for port in self.ports:
            self.servers.append(await asyncio.start_server(
                lambda r, w, port=port: self._spawn(self._link(r, w, port)), "127.0.0.1", port))
        self._spawn(self._cutter())

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _link(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter, port: int) -> None:
        self.counts["connections"] += 1
        try:
            up_r, up_w = await asyncio.open_connection(self.target, port)
        except OSError:
            down_w.transport.abort()
            return
        link = (down_w, up_w)
        self.links.add(link)
        try:
            await asyncio.gather(self._pipe(down_r, up_w), self._pipe(up_r, down_w))
        finally:
            self.links.discard(link)
            for w in link:
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.chaos:
                    roll = self.rng.random()
                    if roll < 0.004:  # a long stall: longer than three unanswered pings
                        self.counts["long stalls"] += 1
                        await asyncio.sleep(self.rng.uniform(4.0, 7.0))
                    elif roll < 0.02:
                        self.counts["stalls"] += 1
                        await asyncio.sleep(self.rng.uniform(0.5, 2.0))
                    elif roll < 0.2:
                        self.counts["delays"] += 1
                        await asyncio.sleep(self.rng.uniform(0.005, 0.15))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()  # one side gone: the other goes too, as a cut would

    async def _cutter(self) -> None:
        """Every so often, while chaos lasts, cut one connection (both ends, RST)."""
        while True:
            await asyncio.sleep(self.rng.uniform(0.3, 1.5))  # the fault's schedule
            if self.chaos and self.links:
                victim = self.rng.choice(sorted(self.links, key=id))
                self.counts["cuts"] += 1
                for w in victim:
                    w.transport.abort()

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        for a, b in list(self.links):
            a.transport.abort()
            b.transport.abort()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def free_relay_base() -> int:
    """P with P..P+2 free on both 127.0.0.1 (the relay) and 127.0.0.2 (the broker)."""
    for _ in range(100):
        base = free_port_base()
        try:
            for port in range(base, base + 3):
                with socket.socket() as s:
                    s.bind(("127.0.0.2", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports")


async def test_flaky_network_for_60s_every_reader_has_every_acked_line_once(tmp_path: Path) -> None:
    base = free_relay_base()
    broker = await RunningBroker(tmp_path / "history.db", Limits(heartbeat=HEARTBEAT, rate=0), bind=f"tcp://127.0.0.2:{base}").start()
    relay = FlakyRelay("127.0.0.2", [base, base + 2], SEED)
    await relay.start()
    # The relay stands for the broker, which runs in the tests' plaintext mode (the
    # relay would otherwise need the key port too, and cutting it only tests pinning).
    keys.declare_insecure(f"tcp://127.0.0.1:{base}")
    clients: list[Client] = []
    views: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    gaps: list[Gap] = []
    states: dict[str, list[str]] = collections.defaultdict(list)
    ok: set[str] = set()
    failed: list[tuple[str, str]] = []
    tasks: list[asyncio.Task] = []
    try:
        def listener(name: str, reading: bool):  # type: ignore[no-untyped-def]
            def handle(events: list) -> None:
                for event in events:
                    if reading and isinstance(event, p.Msg) and event.room == ROOM and event.kind == "text":
                        views[name].append((event.seq, event.text))
                    elif isinstance(event, Gap):
                        gaps.append(event)
                    elif isinstance(event, StateChange):
                        states[name].append(event.state)
            return handle

        for i in range(READERS + SENDERS):
            name = f"r{i}" if i < READERS else f"s{i}"
            client = Client(f"tcp://127.0.0.1:{base}", name, f"secret-of-{name}-0123456789", ack_timeout=1.0)
            await client.connect()
            assert client.welcome is not None and client.welcome.pub_port == base + 2
            await client.join(ROOM)
            client.listen(listener(name, i < READERS))
            clients.append(client)

        stop_sending = asyncio.Event()

        async def sending(client: Client) -> None:
            n = 0
            while not stop_sending.is_set():
                text = f"{client.name}-{n}"
                n += 1
                try:
                    await client.send(ROOM, text, timeout=90)
                    ok.add(text)
                except (ClientError, asyncio.TimeoutError) as exc:  # recorded, asserted below
                    failed.append((text, repr(exc)))
                await asyncio.sleep(PAUSE)  # a fast typist's pace, not a wait for an event

        relay.chaos = True
        tasks = [asyncio.ensure_future(sending(c)) for c in clients[READERS:]]
        started = time.monotonic()
        while time.monotonic() - started < CHAOS:
            await asyncio.sleep(0.5)  # the fault lasts CHAOS seconds
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        relay.chaos = False
        acked_in_chaos = len(ok)
        stop_sending.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        print(f"relay: {dict(relay.counts)}; acked {len(ok)} ({acked_in_chaos} during the chaos), failed {len(failed)}")
        assert not failed, f"sends failed: {failed[:5]}"
        assert relay.counts["cuts"] >= 10 and relay.counts["long stalls"] >= 1 and relay.counts["stalls"] >= 5, relay.counts
        assert acked_in_chaos >= 100, f"too little got through the chaos to say much: {acked_in_chaos}"

        def caught_up() -> bool:
            return all(ok <= {text for _seq, text in views[c.name]} for c in clients[:READERS])

        await wait_for(caught_up, 90, "readers to catch up")
        assert not gaps, f"gaps reported while connected: {gaps[:5]}"
        for reader in clients[:READERS]:
            seqs = [seq for seq, _text in views[reader.name]]
            assert seqs == sorted(set(seqs)), f"{reader.name}: seqs out of order or doubled"
            texts = [text for _seq, text in views[reader.name]]
            assert len(texts) == len(set(texts)), f"{reader.name}: a line delivered twice"
        assert any("reconnecting" in s for s in states.values()), "no client ever noticed the flaky network"
    finally:
        for task in tasks:
            task.cancel()
        for client in clients:
            await client.close()
        await relay.close()
        await broker.stop()
        keys.undeclare_insecure(f"tcp://127.0.0.1:{base}")
