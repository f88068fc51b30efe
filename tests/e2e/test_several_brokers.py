"""Three ``zchat broker`` processes on one real redis-server (started here, with the
persistence the docs recommend: appendonly yes, appendfsync always), CURVE on, each
broker with its own key; clients in this process given every broker's keyed address.

Failures: kill -9 of a broker (presence, failover under six senders) and of Redis
itself mid-traffic. Skipped, with the reason, without redis-server.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, wait_for
from tests.integration.conftest import _free_port, _pings
from zchat import protocol as p
from zchat.broker.engines.redis import BEAT, PRESENCE_TTL
from zchat.client import Client
from zchat.recovery import Gap
from zchat.storage.redis import RedisStorage

HEARTBEAT = 0.5
#: How long after a kill -9 its users may still look online (docs/architecture.md):
#: the heartbeat key's TTL, one look for expired keys, and slack for a loaded machine.
OFFLINE_BOUND = PRESENCE_TTL + BEAT


class RedisProc:
    """A redis-server on loopback that fsyncs every write; kill -9 and restart it on the
    same port and directory."""

    def __init__(self, exe: str, workdir: Path) -> None:
        self.exe, self.dir, self.port = exe, workdir, _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProc:
        cmd = [
            self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not _pings(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.dir / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.02)  # poll interval
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProc]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (.ci/run installs it)")
    (tmp_path / "redis").mkdir()
    server = RedisProc(exe, tmp_path / "redis").start()
    yield server
    server.kill()


class Fleet:
    """Three broker processes on one Redis store, each with its own key directory."""

    def __init__(self, tmp_path: Path, env: dict[str, str], url: str) -> None:
        self.tmp, self.env, self.url = tmp_path, env, url
        self.prefix = f"zchat-e2e:{uuid.uuid4().hex}:"
        self.procs: list[BrokerProcess] = []
        self.addresses: list[str] = []

    def start(self, n: int = 3) -> Fleet:
        for i in range(n):
            home = self.tmp / f"broker-{i}"  # its key lives beside its (unused) SQLite file
            env = dict(self.env, ZCHAT_DATA_DIR=str(home))
            proc = BrokerProcess(
                home / "unused.db", env, "--storage", self.url + f"?prefix={self.prefix}",
                "--heartbeat", str(HEARTBEAT), "--rate", "0", "--request-rate", "0", "--log-level", "WARNING",
            )
            shown = subprocess.run(
                [sys.executable, "-m", "zchat", "broker", "--bind", proc.endpoint, "--db", str(home / "unused.db"), "--show-address"],
                env=env, capture_output=True, text=True, timeout=30, check=True,
            )
            self.addresses.append(shown.stdout.split()[0])
            self.procs.append(proc.start())
        return self

    def to(self, first: int) -> str:
        """Every broker's address, ``first``'s first (where a client starts)."""
        order = self.addresses[first:] + self.addresses[:first]
        return ",".join(order)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop()


@pytest.fixture
def fleet(tmp_path: Path, cli_env: dict[str, str], redis_proc: RedisProc) -> Iterator[Fleet]:
    brokers = Fleet(tmp_path, cli_env, redis_proc.url).start()
    yield brokers
    brokers.stop()


@pytest.fixture
async def people() -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    await asyncio.gather(*(c.close() for c in made), return_exceptions=True)


async def person(made: list[Client], address: str, name: str) -> Client:
    client = Client(address, name, f"secret-of-{name}-0123456789", recover_limit=1_000_000, trust_new_broker=False)
    await client.connect(timeout=15)
    made.append(client)
    return client


class View:
    """room -> seq -> (sender, kind, text) as one client delivered them, doubles kept apart."""

    def __init__(self, client: Client) -> None:
        self.name = client.name
        self.seen: dict[str, dict[int, tuple[str, str, str]]] = {}
        self.doubled: list[p.Msg] = []
        self.gaps: list[Gap] = []  # none may come: everything acked is in history
        client.listen(self.on)

    def on(self, events: list) -> None:
        for event in events:
            if isinstance(event, p.Msg):
                room = self.seen.setdefault(event.room, {})
                if event.seq in room:
                    self.doubled.append(event)
                room[event.seq] = (event.sender, event.kind, event.text)
            elif isinstance(event, Gap):
                self.gaps.append(event)

    def texts(self, room: str) -> list[str]:
        return [t for _, kind, t in self.seen.get(room, {}).values() if kind == "text"]


def test_the_storage_url_names_a_prefix(tmp_path: Path) -> None:
    """Brokers of one set share a prefix; the URL carries it (?prefix=)."""
    from zchat.storage import open_storage

    store = open_storage("redis://127.0.0.1:1/0?prefix=set-a:", tmp_path / "x.db")
    assert isinstance(store, RedisStorage) and store.prefix == "set-a:" and store.url == "redis://127.0.0.1:1/0"


async def test_three_broker_processes_two_rooms_one_mapping(fleet: Fleet, people: list[Client]) -> None:
    """Two clients on each broker process, two rooms, all sending at once: every client
    ends with the same seq -> message mapping of each room, no gap, no double."""
    clients = [await person(people, fleet.to(i % 3), f"u{i}") for i in range(6)]
    views = [View(c) for c in clients]
    for c in clients:
        for room in ("dev", "ops"):
            await c.join(room)
    acks = await asyncio.wait_for(
        asyncio.gather(*(c.post(("dev", "ops")[j % 2], f"{c.name}-{j}") for c in clients for j in range(10))), 60
    )
    for room in ("dev", "ops"):
        head = max(s.seq for s in acks if s.room == room)
        assert head == 6 + 30
        want = set(range(7, head + 1))
        for v in views:
            await wait_for(lambda v=v, want=want, room=room: want <= set(v.seen.get(room, {})), 20, f"{v.name} to see {room}")
        maps = [{s: x for s, x in v.seen[room].items() if s in want} for v in views]
        assert all(m == maps[0] for m in maps)
        assert sorted(t for _, kind, t in maps[0].values() if kind == "text") == sorted(
            f"u{i}-{j}" for i in range(6) for j in range(10) if ("dev", "ops")[j % 2] == room
        )
    assert not any(v.doubled for v in views)


async def test_presence_across_broker_processes_and_kill_9(fleet: Fleet, people: list[Client]) -> None:
    """alice joining on A is online for carol on C; bob's broker B killed with -9: bob
    is offline for carol within the documented bound (PRESENCE_TTL + BEAT)."""
    carol = await person(people, fleet.addresses[2], "carol")
    await carol.join("dev")
    events: list = []
    carol.listen(events.extend)
    alice = await person(people, fleet.addresses[0], "alice")
    bob = await person(people, fleet.addresses[1], "bob")  # B only: no failover to come back
    await alice.join("dev")
    await bob.join("dev")

    async def online() -> dict[str, bool]:
        return {m.name: m.online for m in await carol.who("dev")}

    deadline = time.monotonic() + 10
    while await online() != {"alice": True, "bob": True, "carol": True}:
        assert time.monotonic() < deadline, await online()
        await asyncio.sleep(0.05)  # poll interval
    fleet.procs[1].proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    killed = time.monotonic()
    await wait_for(
        lambda: any(isinstance(e, p.Presence) and e.name == "bob" and not e.online for e in events),
        OFFLINE_BOUND + 5, "bob offline on C",
    )
    took = time.monotonic() - killed
    assert await online() == {"alice": True, "bob": False, "carol": True}
    print(f"bob offline on C {took:.2f}s after kill -9 of B (bound {OFFLINE_BOUND:g}s)")
    assert took <= OFFLINE_BOUND + 2.0  # slack: a loaded machine's scheduling


async def _check_views(acked: list[p.Stored], texts: dict[str, str], readers: list[View], room: str) -> None:
    """Every acked line in every reader's view exactly once, under its acked seq."""
    want = {s.seq for s in acked}
    for v in readers:
        try:
            await wait_for(lambda v=v: want <= set(v.seen.get(room, {})), 30, f"{v.name} to see every acked line")
        except AssertionError as exc:
            missing = sorted(want - set(v.seen.get(room, {})))
            raise AssertionError(
                f"{exc}: missing seqs {missing[:30]} of {len(want)} (saw {len(v.seen.get(room, {}))}); gaps {v.gaps}"
            ) from None
        for s in acked:
            assert v.seen[room][s.seq][2] == texts[s.cid], (v.name, s)
        mine = v.texts(room)
        assert len(mine) == len(set(mine)), f"{v.name} saw a line twice"
        assert not v.doubled
        assert not v.gaps, f"{v.name}: {v.gaps}"


async def _send_all(clients: list[Client], room: str, count: int, pause: float) -> tuple[list[p.Stored], dict[str, str]]:
    """Each client sends ``count`` lines, one every ``pause`` seconds; all must be acked."""
    texts: dict[str, str] = {}

    async def one(c: Client) -> list[p.Stored]:
        futures = []
        for i in range(count):
            futures.append(c.post(room, f"{c.name}-{i}"))
            cid = next(reversed(c._pending))
            texts[cid] = f"{c.name}-{i}"
            await asyncio.sleep(pause)  # the senders' pace, not a wait for an event
        return list(await asyncio.wait_for(asyncio.gather(*futures), 90))

    done = await asyncio.gather(*(one(c) for c in clients))
    return [s for acks in done for s in acks], texts


async def test_kill_9_of_a_broker_under_six_senders(fleet: Fleet, people: list[Client]) -> None:
    """Two senders and one reader on each broker; B is killed with -9 mid-traffic. Its
    clients fail over; every send that returned success is in every reader's view once."""
    senders = [await person(people, fleet.to(i % 3), f"s{i}") for i in range(6)]
    readers = [await person(people, fleet.to(i), f"r{i}") for i in range(3)]
    views = [View(r) for r in readers]
    for c in senders + readers:
        await c.join("dev")
    traffic = asyncio.ensure_future(_send_all(senders, "dev", 40, 0.05))
    await wait_for(lambda: all(len(v.texts("dev")) >= 20 for v in views), 20, "traffic to flow")
    fleet.procs[1].proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    acked, texts = await asyncio.wait_for(traffic, 120)
    assert len(acked) == 240 and len({s.seq for s in acked}) == 240
    assert {c.broker for c in senders + readers} <= {a.partition("#")[0] for a in (fleet.addresses[0], fleet.addresses[2])}
    await _check_views(acked, texts, views, "dev")


async def test_redis_restarted_mid_traffic_loses_nothing_acked(
    fleet: Fleet, people: list[Client], redis_proc: RedisProc
) -> None:
    """Redis killed with -9 and started again (appendfsync always) while three senders
    send: the brokers reconnect, sends in the outage are refused storage_unavailable
    and resent by the library, and nothing acked is lost (in Redis and every view)."""
    senders = [await person(people, fleet.to(i), f"s{i}") for i in range(3)]
    readers = [await person(people, fleet.to(i), f"r{i}") for i in range(3)]
    views = [View(r) for r in readers]
    for c in senders + readers:
        await c.join("dev")
    traffic = asyncio.ensure_future(_send_all(senders, "dev", 60, 0.05))
    await wait_for(lambda: all(len(v.texts("dev")) >= 20 for v in views), 20, "traffic to flow")
    redis_proc.kill()
    await asyncio.sleep(1.0)  # an outage of a second, while the senders go on (not a wait for an event)
    redis_proc.start()
    acked, texts = await asyncio.wait_for(traffic, 120)
    assert len(acked) == 180 and len({s.seq for s in acked}) == 180
    store = RedisStorage(redis_proc.url, prefix=fleet.prefix)
    await store.open()
    try:
        stored = await store.range("dev", 0, 10_000)
    finally:
        await store.close()
    by_seq = {m.seq: m for m in stored}
    for s in acked:
        assert by_seq[s.seq].text == texts[s.cid]
    lines = [m.text for m in stored if m.kind == "text"]
    assert len(lines) == len(set(lines)) == 180
    await _check_views(acked, texts, views, "dev")
