"""Several brokers on one Redis, in this process: one numbering, one conversation.

Real brokers on real sockets sharing a real redis-server (tests/integration/conftest.py);
the subprocess tests with kill -9 are in tests/e2e/test_several_brokers.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import HEARTBEAT, RunningBroker, wait_for
from zchat import protocol as p
from zchat.client import Client
from zchat.core import Limits
from zchat.storage.redis import RedisStorage

LIMITS = Limits(heartbeat=HEARTBEAT, rate=0, room_rate=0, request_rate=0)


@pytest.fixture
async def brokers(redis_url: str, tmp_path: Path) -> AsyncIterator[Callable[[int], Awaitable[list[RunningBroker]]]]:
    """``await brokers(n)``: n brokers sharing one Redis store (a fresh prefix per test)."""
    prefix = f"zchat-test:{uuid.uuid4().hex}:"
    running: list[RunningBroker] = []

    async def make(n: int) -> list[RunningBroker]:
        for i in range(n):
            b = RunningBroker(tmp_path / f"unused-{i}.db", LIMITS, storage=lambda: RedisStorage(redis_url, prefix=prefix))
            running.append(await b.start())
        return running[-n:]

    yield make
    for b in running:
        await b.stop()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    made: list[Client] = []

    async def make(broker: RunningBroker, name: str) -> Client:
        client = Client(broker.endpoint, name, f"secret-of-{name}-0123456789", recover_limit=1_000_000)
        await client.connect()
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def views(client: Client, rooms: tuple[str, ...]) -> Callable[[], dict[str, dict[int, tuple[str, str, str]]]]:
    """A live view: room -> seq -> (sender, kind, text) of every message ``client`` delivered."""
    seen: dict[str, dict[int, tuple[str, str, str]]] = {room: {} for room in rooms}
    doubled: list[p.Msg] = []

    def on(events: list) -> None:
        for event in events:
            if isinstance(event, p.Msg) and event.room in seen:
                if event.seq in seen[event.room]:
                    doubled.append(event)
                seen[event.room][event.seq] = (event.sender, event.kind, event.text)

    client.listen(on)

    def get() -> dict[str, dict[int, tuple[str, str, str]]]:
        assert not doubled, f"{client.name} got a seq twice: {doubled[:3]}"
        return seen

    return get


async def test_two_brokers_number_one_room_together(brokers, clients) -> None:
    """Lines sent at once through two brokers to one room get one numbering: every
    seq once, no gap, and every client (on either broker) holds the same mapping.
    Fails on main: both brokers numbered alone, (room, seq) collided in Redis and
    lines were refused (internal) and resent for seconds."""
    a, b = await brokers(2)
    alice, bob = await clients(a, "alice"), await clients(b, "bob")
    seen = {client.name: views(client, ("dev",)) for client in (alice, bob)}
    for client in (alice, bob):
        await client.join("dev")
    sends = [alice.post("dev", f"a{i}") for i in range(40)] + [bob.post("dev", f"b{i}") for i in range(40)]
    acks = await asyncio.wait_for(asyncio.gather(*sends), 15)
    seqs = sorted(s.seq for s in acks)
    assert len(set(seqs)) == 80
    head = max(seqs)
    assert head == 82  # two join lines and 80 lines, nothing skipped
    # A client's view starts after its own join line (its Joined head): 3.. for both.
    for name, get in seen.items():
        await wait_for(lambda get=get: len([s for s in get()["dev"] if s >= 3]) >= head - 2, 10, f"{name} to see 3..{head}")
    common = {client: {s: v for s, v in get()["dev"].items() if s >= 3} for client, get in seen.items()}
    assert common["alice"] == common["bob"]
    assert sorted(common["alice"]) == list(range(3, head + 1))
    texts = sorted(t for _, kind, t in common["alice"].values() if kind == "text")
    assert texts == sorted([f"a{i}" for i in range(40)] + [f"b{i}" for i in range(40)])
    for broker in (a, b):
        assert broker.core.heads["dev"] == head


async def test_the_same_cid_through_two_brokers_is_stored_once(brokers, clients) -> None:
    """A resend through another broker (after a failover) gets the original ack and
    is neither stored nor published again."""
    a, b = await brokers(2)
    on_a, on_b = await clients(a, "alice"), await clients(b, "alice")
    reader = await clients(b, "bob")
    for client in (on_a, reader):
        await client.join("dev")
    seen = views(reader, ("dev",))
    first = await on_a.send("dev", "only once")
    on_b._cid_base, on_b._cid_count = on_a._cid_base, on_a._cid_count - 1  # the same cid next
    again = await on_b.send("dev", "only once")
    assert again == first
    marker = await on_a.send("dev", "marker")
    await wait_for(lambda: marker.seq in seen()["dev"], 10, "the marker")
    assert marker.seq == first.seq + 1
    texts = [t for _, kind, t in seen()["dev"].values() if kind == "text"]
    assert texts.count("only once") == 1
    stored = await a.broker.storage.range("dev", 0, 100)
    assert [m.text for m in stored if m.kind == "text"] == ["only once", "marker"]
    assert b.core.counters.get("duplicate_elsewhere") == 1
