"""Several brokers on one Redis, in this process: one numbering, one conversation.

Real brokers on real sockets sharing a real redis-server (tests/integration/conftest.py);
the subprocess tests with kill -9 are in tests/e2e/test_several_brokers.py.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import HEARTBEAT, RunningBroker, free_port_base, wait_for
from zchat import protocol as p
from zchat.client import Client, ClientError
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


async def test_three_brokers_two_rooms_one_mapping(brokers, clients) -> None:
    """Two clients on each of three brokers, in two rooms, all sending at once: every
    client ends with the same seq -> message mapping of each room, no gap, no double."""
    trio = await brokers(3)
    people = [await clients(trio[i % 3], f"u{i}") for i in range(6)]
    rooms = ("dev", "ops")
    seen = [views(c, rooms) for c in people]
    for c in people:
        for room in rooms:
            await c.join(room)
    sends = [c.post(rooms[j % 2], f"{c.name}-{j}") for c in people for j in range(20)]
    acks = await asyncio.wait_for(asyncio.gather(*sends), 30)
    heads = {room: max(s.seq for s in acks if s.room == room) for room in rooms}
    assert heads == {"dev": 66, "ops": 66}  # 6 joins and 60 lines each
    start = {room: 7 for room in rooms}  # every view has everything after the last join
    for i, get in enumerate(seen):
        for room in rooms:
            await wait_for(
                lambda g=get, r=room: set(range(start[r], heads[r] + 1)) <= set(g()[r]), 15, f"u{i} to see {room}"
            )
    for room in rooms:
        maps = [{s: v for s, v in get()[room].items() if s >= start[room]} for get in seen]
        assert all(m == maps[0] for m in maps), f"views of {room} differ"
        assert sorted(maps[0]) == list(range(start[room], heads[room] + 1))
        texts = sorted(t for _, kind, t in maps[0].values() if kind == "text")
        assert texts == sorted(f"u{i}-{j}" for i in range(6) for j in range(20) if rooms[j % 2] == room)


async def test_presence_and_members_across_brokers(brokers, clients) -> None:
    """A user who joins on A is a member and online for a client on C; when they go,
    C hears it and `who` says offline; `rooms` on C counts them."""
    a, _b, c = await brokers(3)
    carol = await clients(c, "carol")
    await carol.join("dev")
    events: list = []
    carol.listen(events.extend)
    alice = await clients(a, "alice")
    await alice.join("dev")
    await wait_for(lambda: any(isinstance(e, p.Msg) and e.kind == "join" and e.sender == "alice" for e in events), 10, "alice's join on C")
    members = {m.name: m.online for m in await carol.who("dev")}
    assert members == {"alice": True, "carol": True}
    assert [(r.name, r.members, r.online) for r in await carol.rooms()] == [("dev", 2, 2)]
    await alice.close()
    await wait_for(lambda: any(isinstance(e, p.Presence) and e.name == "alice" and not e.online for e in events), 10, "alice offline on C")
    assert {m.name: m.online for m in await carol.who("dev")} == {"alice": False, "carol": True}


async def test_a_dm_crosses_brokers(brokers, clients) -> None:
    """A direct message from a user on A reaches its addressee on B (inbox channels)."""
    a, b = await brokers(2)
    alice, bob = await clients(a, "alice"), await clients(b, "bob")
    events: list = []
    bob.listen(events.extend)
    await wait_for(lambda: "alice" in b.core.users, 10, "B to know alice")
    stored = await alice.send_dm("bob", "psst")
    await wait_for(lambda: any(isinstance(e, p.Msg) and e.text == "psst" for e in events), 10, "the DM on B")
    got = next(e for e in events if isinstance(e, p.Msg) and e.text == "psst")
    assert (got.room, got.seq) == (stored.room, stored.seq)


async def test_a_client_fails_over_to_the_next_broker(brokers) -> None:
    """A client given two brokers moves to the second when the first goes, resends
    what was not acked, and keeps its rooms: a reader sees every line once."""
    a, b = await brokers(2)
    alice = Client(f"{a.endpoint},{b.endpoint}", "alice", "secret-of-alice-0123456789", recover_limit=1_000_000)
    bob = Client(b.endpoint, "bob", "secret-of-bob-0123456789", recover_limit=1_000_000)
    try:
        await alice.connect()
        await bob.connect()
        seen = views(bob, ("dev",))
        await alice.join("dev")
        await bob.join("dev")
        before = await asyncio.gather(*(alice.post("dev", f"before-{i}") for i in range(10)))
        await a.stop()
        during = [alice.post("dev", f"during-{i}") for i in range(10)]  # pending until B takes them
        after = await asyncio.wait_for(asyncio.gather(*during), 30)
        assert alice.broker == b.endpoint
        seqs = [s.seq for s in before + after]
        assert len(set(seqs)) == 20
        await wait_for(lambda: set(seqs) <= set(seen()["dev"]), 15, "bob to see all 20")
        texts = [t for _, kind, t in seen()["dev"].values() if kind == "text"]
        assert sorted(texts) == sorted([f"before-{i}" for i in range(10)] + [f"during-{i}" for i in range(10)])
        assert {m.name for m in await alice.who("dev")} == {"alice", "bob"}
    finally:
        await alice.close()
        await bob.close()


def _cluster_port() -> int:
    """A free port P whose cluster bus port P+10000 is free too (both below the
    ephemeral range)."""
    for _ in range(200):
        port = free_port_base(1)
        if port + 10000 >= 32768:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _cluster_or_skip(workdir: Path) -> tuple[list[subprocess.Popen[bytes]], int]:
    """Three local Redis Cluster nodes sharing the slots, or skip saying why."""
    exe, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if exe is None or cli is None:
        pytest.skip("redis-server and redis-cli are needed for a Redis Cluster")
    procs, ports = [], []
    try:
        for i in range(3):
            port = _cluster_port()
            d = workdir / f"node-{i}"
            d.mkdir()
            procs.append(subprocess.Popen(
                [exe, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes", "--cluster-config-file",
                 str(d / "nodes.conf"), "--save", "", "--appendonly", "no", "--dir", str(d), "--logfile", str(d / "log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            ports.append(port)
        deadline = time.monotonic() + 15
        for port in ports:
            while subprocess.run([cli, "-p", str(port), "ping"], capture_output=True, text=True, check=False).stdout.strip() != "PONG":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {port} did not answer")
                time.sleep(0.05)  # poll interval
        made = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports), "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if made.returncode != 0:
            raise RuntimeError(made.stdout[-500:] + made.stderr[-500:])
        while "cluster_state:ok" not in subprocess.run([cli, "-p", str(ports[0]), "cluster", "info"], capture_output=True, text=True, check=False).stdout:
            if time.monotonic() > deadline + 15:
                raise RuntimeError("the cluster did not become ok")
            time.sleep(0.05)  # poll interval
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        for proc in procs:
            proc.kill()
            proc.wait()
        pytest.skip(f"cannot run a Redis Cluster here: {exc}")
    return procs, ports[0]


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[str]:
    procs, port = _cluster_or_skip(tmp_path)
    yield f"redis://127.0.0.1:{port}/0"
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


async def test_rooms_on_different_shards_of_a_redis_cluster(redis_cluster: str, tmp_path: Path, clients) -> None:
    """Three brokers on a three-node Redis Cluster: rooms land on different shards (by
    their {room} hash tag) and the chat holds one mapping per room."""
    prefix = f"zchat-test:{uuid.uuid4().hex}:"
    trio = []
    try:
        for i in range(3):
            b = RunningBroker(tmp_path / f"unused-{i}.db", LIMITS, storage=lambda: RedisStorage(redis_cluster, prefix=prefix, cluster=True))
            trio.append(await b.start())
        rooms = ("dev", "ops", "qa")
        store = trio[0].broker.storage
        nodes = {room: store._redis.get_node_from_key(store.room_key(room, "log")).name for room in rooms}
        assert len(set(nodes.values())) >= 2, nodes  # these names hash to different slots' owners
        people = [await clients(trio[i], f"u{i}") for i in range(3)]
        seen = [views(c, rooms) for c in people]
        for c in people:
            for room in rooms:
                await c.join(room)
        acks = await asyncio.wait_for(asyncio.gather(*(c.post(room, f"{c.name}-{room}-{j}") for c in people for room in rooms for j in range(5))), 30)
        for room in rooms:
            head = max(s.seq for s in acks if s.room == room)
            assert head == 3 + 15
            for get in seen:
                await wait_for(lambda g=get, r=room, h=head: set(range(4, h + 1)) <= set(g()[r]), 15, f"{room} everywhere")
            maps = [{s: v for s, v in get()[room].items() if s >= 4} for get in seen]
            assert all(m == maps[0] for m in maps)
    finally:
        for b in trio:
            await b.stop()


async def test_a_private_room_across_brokers(brokers, clients) -> None:
    """Room settings made on A hold on B: a private room created on A admits on B only
    whom its operator invited; its lines reach members on B on B's own private topic,
    and a member kicked on A stops hearing it on B too."""
    a, b = await brokers(2)
    alice, bob, carol = await clients(a, "alice"), await clients(b, "bob"), await clients(b, "carol")
    await wait_for(lambda: {"bob", "carol"} <= a.core.users, 10, "A to know bob and carol")
    await alice.join("secret", private=True)
    await alice.invite("secret", "bob")
    await wait_for(lambda: "bob" in b.core.role_of("secret", "invite") or "bob" in b.core.members.get("secret", ()), 10, "B to learn the invite")
    await bob.join("secret")
    with pytest.raises(ClientError):
        await carol.join("secret")
    for c in (alice, bob):
        await c.join("lobby")
    events: list = []
    bob.listen(events.extend)
    await alice.send("lobby", "settle")  # every earlier line delivered before we count fills
    await wait_for(lambda: any(isinstance(e, p.Msg) and e.text == "settle" for e in events), 10, "the lobby line")
    filled = bob.recovered
    await alice.send("secret", "for bob")
    await wait_for(lambda: any(isinstance(e, p.Msg) and e.text == "for bob" for e in events), 10, "the private line on B")
    assert bob.recovered == filled  # live, on B's own topic for the room, not fetched from history
    token = b.core.tokens["secret"]
    await alice.kick("secret", "bob")
    await wait_for(lambda: "bob" not in b.core.members.get("secret", ()), 10, "B to drop bob")
    assert b.core.tokens["secret"] != token  # B moved the room to a new topic too: bob's old one hears nothing
    await alice.send("secret", "not for bob")
    await alice.send("lobby", "marker")
    await wait_for(lambda: any(isinstance(e, p.Msg) and e.text == "marker" for e in events), 10, "the marker")
    assert not any(isinstance(e, p.Msg) and e.text == "not for bob" for e in events)


async def test_an_edit_and_a_delete_on_one_broker_reach_clients_of_another(brokers, clients) -> None:  # type: ignore[no-untyped-def]
    """A sender on broker A edits and deletes its line: a reader on broker B gets both
    lines live and reads the latest state from history (the edit's text, then the
    tombstone)."""
    a, b = await brokers(2)
    alice, bob = await clients(a, "alice"), await clients(b, "bob")
    await bob.join("general")
    await alice.join("general")
    seen = views(bob, ("general",))
    stored = await alice.send("general", "teh line")
    await wait_for(lambda: stored.seq in seen()["general"], what="the line on the other broker")
    await alice.edit("general", stored.seq, "the line")
    await wait_for(lambda: any(k == "edit" for _, k, _ in seen()["general"].values()), what="the edit line on the other broker")
    history = {m.seq: m for m in await bob.history("general")}
    assert history[stored.seq].text == "the line"
    await alice.delete_own("general", stored.seq)
    await wait_for(lambda: any(k == "delete" for _, k, _ in seen()["general"].values()), what="the delete line on the other broker")
    history = {m.seq: m for m in await bob.history("general")}
    assert history[stored.seq].kind == "deleted"
