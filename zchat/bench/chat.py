"""The "realistic chat" scenario: many connected clients, a few of them talking.

1,000 connected clients, 50 of them sending a line every 2-10 s (uniform, seeded), for a
minute: what a chat broker does most of its life. Measured: the server's CPU (% of a
core over the minute), latency p50/p99 as every listener sees it, and the server's RSS.

The 50 talkers live in one process (``talkers``), speaking the same control protocol as
``clients.publisher`` (ready, probes, go, result, flush), so ``scenarios.Traffic`` drives
them like any publisher; the listeners are ordinary subscriber groups in latency mode.
The zchat broker runs with its default heartbeat here, as a user's would.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import time
from typing import Any

from zchat.bench import procs
from zchat.bench.clients import HWM, Ctl, PubPlan, _report_error, _ThreadedSend
from zchat.bench.common import FLUSH, PROBE, ROOM, SECRET, base, now, record, text

SEED = 15  # the talkers' schedule is the same in every run and for every system


@dataclasses.dataclass(frozen=True)
class ChatSize:
    clients: int  # connected in all, talkers included
    talkers: int
    seconds: float
    gap: tuple[float, float]  # seconds between one talker's lines (uniform)


SIZES = {
    "tiny": ChatSize(clients=20, talkers=4, seconds=2.0, gap=(0.2, 1.0)),
    "quick": ChatSize(clients=300, talkers=15, seconds=15.0, gap=(2.0, 10.0)),
    "full": ChatSize(clients=1000, talkers=50, seconds=60.0, gap=(2.0, 10.0)),
}


def schedule(size: ChatSize, seed: int = SEED) -> list[tuple[float, int]]:
    """(offset from go in seconds, talker) for every line of the run, in time order."""
    rng = random.Random(seed)
    heap = [(rng.uniform(*size.gap), k) for k in range(size.talkers)]
    heapq.heapify(heap)
    out = []
    while heap and heap[0][0] < size.seconds:
        at, k = heapq.heappop(heap)
        out.append((at, k))
        heapq.heappush(heap, (at + rng.uniform(*size.gap), k))
    return out


class _ZmqTalkers:
    """PUSH sockets, one per talker, on one context (one I/O thread, like one app)."""

    def __init__(self, ep: dict, n: int) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.socks = []
        for _ in range(n):
            s = self.ctx.socket(zmq.PUSH)
            s.sndhwm = HWM
            s.linger = 1000
            s.connect(ep["pull"])
            self.socks.append(s)

    def send(self, k: int, data: bytes, deadline: float = 0.0) -> bool:
        self.socks[k].send(data)
        return True

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.ctx.term()


class _RedisTalkers:
    def __init__(self, ep: dict, n: int) -> None:
        import redis

        self.conns = [redis.Redis(host=ep["host"], port=ep["port"]) for _ in range(n)]
        for r in self.conns:
            r.ping()

    def send(self, k: int, data: bytes, deadline: float = 0.0) -> bool:
        self.conns[k].publish(b"bench", data)
        return True

    def close(self) -> None:
        for r in self.conns:
            r.close()


class _ThreadedTalkers:
    def __init__(self, ep: dict, n: int) -> None:
        self.conns = []
        for k in range(n):
            self.conns.append(_ThreadedSend(ep, k))

    def send(self, k: int, data: bytes, deadline: float = 0.0) -> bool:
        return self.conns[k].one(data, deadline)

    def close(self) -> None:
        for c in self.conns:
            c.close()


def talkers(system: str, ep: dict, idx: int, plan: PubPlan, ctl: Ctl, conn: Any) -> None:
    """The talkers' process: ``plan.seconds`` of the seeded schedule, then the flush protocol."""
    procs.raise_nofile()
    size = SIZES[plan.size]
    try:
        if base(system) == "zchat":
            import asyncio

            asyncio.run(_zchat_talkers(ep, size, plan, ctl, conn))
            return
        cls = {"zmq-proxy": _ZmqTalkers, "py-forwarder": _ZmqTalkers, "redis": _RedisTalkers, "threaded": _ThreadedTalkers}[system]
        out = cls(ep, size.talkers)
        ctl.ready.put(("pub", idx))
        ctl.join_go.wait()
        while not ctl.probes_off.is_set():
            out.send(0, record(PROBE, 0))
            time.sleep(plan.probe)
        ctl.go.wait()
        t0, cpu0 = now(), time.process_time()
        counts = [0] * size.talkers
        for at, k in schedule(size):
            wait = t0 + at - now()
            if wait > 0:
                time.sleep(wait)
            if out.send(k, record(k, counts[k]), deadline=now() + 5):
                counts[k] += 1
        sent = sum(counts)
        ctl.results.put(("pub", idx, {"sent": sent, "t_first": t0, "t_end": now(), "cpu_s": time.process_time() - cpu0}))
        while conn.recv() == "flush":
            sent += out.send(0, record(FLUSH, sent), deadline=now() + 2)
            conn.send(sent)
        out.close()
    except Exception:
        _report_error(ctl, f"{system} talkers")
    time.sleep(0.2)


async def _zchat_talkers(ep: dict, size: ChatSize, plan: PubPlan, ctl: Ctl, conn: Any) -> None:
    import asyncio

    from zchat.client import Client

    clients = [Client(ep["broker"], f"p{k}", SECRET, label="bench") for k in range(size.talkers)]
    await asyncio.gather(*(c.connect(timeout=60) for c in clients))
    for c in clients:
        await c.join(ROOM)

    async def discard(c: Client) -> None:  # a member receives its room: read it like any client
        async for _ in c.events():
            pass

    readers = [asyncio.ensure_future(discard(c)) for c in clients]
    ctl.ready.put(("pub", 0))
    while not ctl.join_go.is_set():
        await asyncio.sleep(0.005)
    while not ctl.probes_off.is_set():
        await clients[0].send(ROOM, text(PROBE, 0))
        await asyncio.sleep(plan.probe)
    while not ctl.go.is_set():
        await asyncio.sleep(0.001)
    t0, cpu0 = now(), time.process_time()
    counts = [0] * size.talkers
    pending = []
    for at, k in schedule(size):
        wait = t0 + at - now()
        if wait > 0:
            await asyncio.sleep(wait)
        pending.append(clients[k].post(ROOM, text(k, counts[k])))
        counts[k] += 1
    await asyncio.gather(*pending)
    sent = sum(counts)
    ctl.results.put(("pub", 0, {"sent": sent, "t_first": t0, "t_end": now(), "cpu_s": time.process_time() - cpu0}))
    while True:
        while not conn.poll():
            await asyncio.sleep(0.005)
        if conn.recv() != "flush":
            break
        await asyncio.wait_for(clients[0].send(ROOM, text(FLUSH, sent)), 10)
        sent += 1
        conn.send(sent)
    for r in readers:
        r.cancel()
    for c in clients:
        await c.close()


def run(bench: Any, system: str) -> dict:
    """One realistic-chat run of ``system`` (a row for the table)."""
    from zchat.bench import scenarios, servers
    from zchat.core import Limits

    size = SIZES[bench.sizes.name]

    def body() -> dict:
        listeners = size.clients - size.talkers
        groups = scenarios.split_groups(listeners, scenarios.MAX_GROUP[system])
        seed = None
        if base(system) == "zchat":
            names = [f"s{g}-{i}" for g, n in enumerate(groups) for i in range(n)] + [f"p{k}" for k in range(size.talkers)]
            seed = scenarios.member_seed(names)
        server = servers.start(system, bench._tmp(f"chat-{system}"), Limits().heartbeat, seed=seed)
        try:
            per = 300e-6 if base(system) == "zchat" else 30e-6  # a probe reaches every listener: keep it light
            plan = PubPlan("chat", seconds=size.seconds, probe=max(0.05, listeners * per), size=bench.sizes.name)
            res = scenarios.Traffic(
                server=server, groups=groups, pubs=1, plan=plan, mode="latency", drain=bench.sizes.drain,
                quiet=3.0, ready_timeout=200.0, pub_target=talkers,
            ).run()
        finally:
            server.stop()
        out = scenarios.summarize(res, res["groups"])
        out.update(clients=size.clients, talkers=size.talkers, seconds=size.seconds,
                   server_cpu_pct=100.0 * res["cpu_s"] / max(1e-9, out["elapsed_s"]))
        return out

    return bench._guard("chat", size.clients, system, body)
