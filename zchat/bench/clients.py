"""Client side of every system: publisher processes and subscriber-group processes.

A subscriber group is one process holding many subscribers of one system (SUB sockets,
Redis connections, TCP sockets, or ``zchat.client.Client`` objects). Each group:

1. connects its subscribers and waits until every one has received a readiness probe
   (a ``PR`` line the publishers send every ``probe`` seconds; never counted);
2. says ready and waits for *go*;
3. counts the lines each subscriber receives (and, by mode, their latency);
4. stops when every subscriber has ``expected`` lines, when nothing arrived for
   ``quiet`` seconds after ``expected`` is known, or on *stop*; then reports.

Publishers connect, probe until told to stop probing, wait for *go*, run their mode
(``blast``: as fast as they can up to a budget or a time window; ``paced``: a fixed rate;
``none``), report, then obey commands (``flush``: send one more line; ``exit``).

zchat publishers and subscribers only use the client library (``zchat.client.Client``):
``connect``, ``join``, ``send`` (returns once the broker acked) and ``events``.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import gc
import selectors
import socket
import threading
import time
from typing import Any, Callable

from zchat.bench import procs
from zchat.bench.common import (
    BLOCK,
    FLUSH,
    PROBE,
    RECORD,
    ROOM,
    SECRET,
    base,
    block,
    now,
    record,
    stamp,
    text,
)

HWM = 100_000
CHANNEL = b"bench"  # Redis channel
ZCHAT_WINDOW = 4096  # lines in flight per zchat publisher in blast mode
ZCHAT_CHUNK = 256  # lines posted per turn of the publisher's loop
REDIS_PIPELINE = 100  # PUBLISH commands per round trip for a blasting Redis publisher


@dataclasses.dataclass
class Ctl:
    """Shared between the orchestrator and its workers (created before the fork)."""

    ready: Any  # Queue of ("sub", gid) / ("pub", idx) / ("error", who, text)
    results: Any  # Queue of ("sub", gid, dict) / ("pub", idx, dict)
    go: Any  # Event
    probes_off: Any  # Event
    stop: Any  # Event
    join_go: Any  # Event: every group is connected; zchat subscribers may join now

    @classmethod
    def make(cls) -> "Ctl":
        m = procs.mp()
        return cls(m.Queue(), m.Queue(), m.Event(), m.Event(), m.Event(), m.Event())


def _report_error(ctl: Ctl, who: str) -> None:
    import traceback

    ctl.ready.put(("error", who, traceback.format_exc(limit=8)))


# ====================================================================== subscribers


class Tally:
    """What one group saw, per subscriber."""

    def __init__(self, n: int, mode: str) -> None:
        self.n = n
        self.mode = mode
        self.counts = [0] * n
        self.last = [0.0] * n
        self.probed = [False] * n
        self.nprobed = 0
        self.garbled = [0] * n
        self.recovered = [0] * n
        self.gaps = [0] * n
        self.lat = array.array("d") if mode == "latency" else None
        self.hop: array.array | None = None
        self.maxlat: dict[int, float] = {}  # scale mode: line number -> slowest arrival
        self.incomplete = False
        self.error = ""
        self.dead: set[int] = set()  # zchat clients that could not join: left out, reported
        self.stuck: list[dict] = []  # zchat clients short of expected at the end: their state
        self.cpu0 = -1.0  # process CPU seconds at go (-1: never started)

    def kill(self, i: int) -> None:
        if i not in self.dead:
            self.dead.add(i)
            self.probe(i)

    def low(self) -> int:
        """Fewest lines any live subscriber has."""
        if not self.dead:
            return min(self.counts)
        return min((c for i, c in enumerate(self.counts) if i not in self.dead), default=1 << 62)

    def probe(self, i: int) -> None:
        if not self.probed[i]:
            self.probed[i] = True
            self.nprobed += 1

    def take(self, i: int, line: str | bytes, t: float) -> bool:
        """Count one line subscriber ``i`` received at ``t``; True for a timed chat line."""
        head = line[:2]
        if head == b"PR" or head == "PR":
            self.probe(i)
            return False
        self.counts[i] += 1
        if head == b"FL" or head == "FL":
            if self.mode == "scale":
                self.scale_line(line, t)
            return False
        if self.lat is not None:
            self.lat.append(t - stamp(line))
        return True

    def scale_line(self, line: str | bytes, t: float) -> None:
        n = int(line[3:12])
        lat = t - stamp(line)
        if lat > self.maxlat.get(n, -1.0):
            self.maxlat[n] = lat

    def report(self) -> dict[str, Any]:
        return {
            "counts": self.counts, "last": self.last, "garbled": self.garbled, "recovered": self.recovered,
            "gaps": self.gaps, "lat": self.lat.tobytes() if self.lat is not None else b"",
            "hop": self.hop.tobytes() if self.hop is not None else b"",
            "maxlat": self.maxlat, "incomplete": self.incomplete, "error": self.error, "dead": sorted(self.dead),
            "stuck": self.stuck, "cpu_s": time.process_time() - self.cpu0 if self.cpu0 >= 0 else 0.0,
        }


class Driver:
    """The group's life cycle around a ``pump(timeout)`` that moves data into a Tally."""

    def __init__(self, tally: Tally, gid: int, ctl: Ctl, expected: Any, quiet: float) -> None:
        self.tally, self.gid, self.ctl, self.expected, self.quiet = tally, gid, ctl, expected, quiet
        self.phase = "probe"
        self.last_tick = now()
        self.last_progress = now()
        self.progress = 0
        self.next_check = 0.0

    def step(self) -> bool:
        """Advance the life cycle after a pump; True when the group is done."""
        t = now()
        if t < self.next_check:
            return False
        self.next_check = t + 0.02
        tally, ctl = self.tally, self.ctl
        if self.phase == "probe":
            if ctl.stop.is_set():
                return True
            if tally.nprobed >= tally.n:
                ctl.ready.put(("sub", self.gid))
                self.phase = "wait"
            return False
        if self.phase == "wait":
            if ctl.stop.is_set():
                return True
            if ctl.go.is_set():
                self.phase = "run"
                self.last_tick = self.last_progress = t
                self.tally.cpu0 = time.process_time()
                # Set-up objects (sockets, clients, connections) stop being scanned by the
                # cyclic GC during the run; done alike for every system's subscribers.
                gc.freeze()
            return False
        if t - self.last_tick > 0.5:  # we were frozen (SIGSTOP): restart the quiet clock
            self.last_progress = t
        self.last_tick = t
        total = sum(tally.counts)
        if total != self.progress:
            self.progress, self.last_progress = total, t
        expected = self.expected.value
        if expected >= 0 and tally.low() >= expected:
            return True
        if expected >= 0 and t - self.last_progress > self.quiet:
            tally.incomplete = True
            return True
        if ctl.stop.is_set():
            tally.incomplete = expected < 0 or tally.low() < expected
            return True
        return False

    def finish(self) -> None:
        self.ctl.results.put(("sub", self.gid, self.tally.report()))


def sub_group(system: str, ep: dict, n: int, gid: int, mode: str, ctl: Ctl, expected: Any, quiet: float) -> None:
    procs.raise_nofile()
    tally = Tally(n, mode)
    driver = Driver(tally, gid, ctl, expected, quiet)
    try:
        if base(system) == "zchat":
            import asyncio

            asyncio.run(_zchat_subs(ep, n, gid, tally, driver))
        else:
            pump = {"zmq-proxy": _zmq_subs, "py-forwarder": _zmq_subs, "redis": _redis_subs, "threaded": _threaded_subs}[system](ep, n, gid, tally)
            ctl.ready.put(("connected", gid))
            while not driver.step():
                pump(20)
    except Exception:
        _report_error(ctl, f"{system} subscriber group {gid}")
        tally.error = "failed"
    driver.finish()
    time.sleep(0.2)  # let the queue's feeder thread hand the report over


def _zmq_subs(ep: dict, n: int, gid: int, tally: Tally) -> Callable[[int], None]:
    """SUB sockets watched through their edge-triggered ZMQ_FD in epoll: the cost of a
    wake-up is the sockets that are ready, not all n (zmq_poll over 1,000 sockets is not)."""
    import zmq

    ctx = zmq.Context()
    ctx.max_sockets = n * 2 + 64
    socks = []
    # Spread the SYNs: the forwarder listens with libzmq's backlog of 100, and an overflow
    # costs a SYN retransmit (1 s, 3 s, ...) or a dead half-open connection until libzmq's
    # 30 s handshake timeout. About 1,000 connects a second over all groups keeps it clear.
    pace = 0.001 * ep.get("groups", 1)
    for _ in range(n):
        s = ctx.socket(zmq.SUB)
        s.rcvhwm = HWM
        s.linger = 0
        s.connect(ep["pub"])
        s.subscribe(b"")
        socks.append(s)
        if pace and n > 100:
            time.sleep(pace)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        sel.register(s.getsockopt(zmq.FD), selectors.EVENT_READ, i)
    last, take = tally.last, tally.take
    NOBLOCK, Again = zmq.NOBLOCK, zmq.Again
    sweep = [0.0]

    def drain(i: int) -> None:
        s, got = socks[i], False
        recv = s.recv
        while True:
            try:
                m = recv(NOBLOCK)
            except Again:
                break
            if take(i, m, now()):
                got = True
        if got:
            last[i] = now()

    POLLIN, EVENTS = zmq.POLLIN, zmq.EVENTS

    def pump(timeout: int) -> None:
        for key, _ in sel.select(timeout / 1000):
            drain(key.data)
        t = now()
        if t > sweep[0]:  # belt and braces for the edge-triggered FD: look at every socket now and then
            sweep[0] = t + 0.5
            for i, s in enumerate(socks):
                if s.getsockopt(EVENTS) & POLLIN:
                    drain(i)

    return pump


def _redis_subs(ep: dict, n: int, gid: int, tally: Tally) -> Callable[[int], None]:
    import redis

    sel = selectors.DefaultSelector()
    subs, owners = [], []
    for i in range(n):
        r = redis.Redis(host=ep["host"], port=ep["port"])
        owners.append(r)  # a collected Redis object closes its pool, and with it our connection
        ps = r.pubsub()
        ps.subscribe(CHANNEL)
        subs.append(ps)
        sel.register(ps.connection._sock, selectors.EVENT_READ, i)  # readiness only; reads go through redis-py
    last, take = tally.last, tally.take

    def pump(timeout: int) -> None:
        pump.owners = owners  # type: ignore[attr-defined]
        for key, _ in sel.select(timeout / 1000):
            i, got = key.data, False
            get = subs[i].get_message
            while True:
                m = get(timeout=0.0)
                if m is None:
                    break
                if m["type"] != "message":
                    continue
                if take(i, m["data"], now()):
                    got = True
            if got:
                last[i] = now()

    return pump


def _threaded_subs(ep: dict, n: int, gid: int, tally: Tally) -> Callable[[int], None]:
    sel = selectors.DefaultSelector()
    carry = [b""] * n
    # The server listens with a backlog of 5: a burst of connects overflows it and each
    # overflow costs a 1 s SYN retransmit, so connect at a pace its accept loop keeps up with.
    pace = 0.0012 * ep.get("groups", 1)
    for i in range(n):
        s = socket.create_connection((ep["host"], ep["port"]))
        s.sendall(f"sub{gid}-{i}".encode())  # the first read is the user's name
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
        time.sleep(pace)
    last, garbled, take = tally.last, tally.garbled, tally.take
    width = RECORD - 1

    def pump(timeout: int) -> None:
        for key, _ in sel.select(timeout / 1000):
            i = key.data
            try:
                data = key.fileobj.recv(262144)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(key.fileobj)
                continue
            lines = (carry[i] + data).split(b"\n")
            carry[i] = lines.pop()
            t, got = now(), False
            for line in lines:
                if len(line) != width or line[2:3] != b"|":
                    garbled[i] += 1  # no framing: concurrent sendalls can interleave
                    continue
                if take(i, line, t):
                    got = True
            if got:
                last[i] = t

    return pump


async def _zchat_subs(ep: dict, n: int, gid: int, tally: Tally, driver: Driver) -> None:
    import asyncio

    import zmq
    import zmq.asyncio

    from zchat import protocol as p
    from zchat.client import Client, Gap

    zmq.asyncio.Context.instance().max_sockets = n * 8 + 64
    clients = [Client(ep["broker"], f"s{gid}-{i}", SECRET, recover_limit=10**9, label="bench") for i in range(n)]
    for start in range(0, n, 100):
        await asyncio.gather(*(c.connect(timeout=120) for c in clients[start : start + 100]))
    driver.ctl.ready.put(("connected", gid))
    while not driver.ctl.join_go.is_set():
        if driver.ctl.stop.is_set():
            return
        await asyncio.sleep(0.01)
    # A Joined reply lists every member of the room (O(members) per join: 3.3 ms and 129 KB
    # at 6,500 members), so joins go 10 at a time per group or they outlast the client's
    # 10 s request timeout behind each other.
    async def join(i: int, c: Client) -> None:
        for _ in range(3):  # join is idempotent; a busy broker may outlast one request
            try:
                await c.join(ROOM)
                return
            except asyncio.TimeoutError:
                pass
        tally.kill(i)  # reported as a client that could not join, not silently dropped

    for start in range(0, n, 10):
        await asyncio.gather(*(join(start + k, c) for k, c in enumerate(clients[start : start + 10])))
    counts, last, lat, take = tally.counts, tally.last, tally.lat, tally.take
    hop = tally.hop = array.array("d") if lat is not None else None  # broker -> subscriber (wall clock)
    Msg = p.Msg
    wall = time.time

    def listener(i: int) -> Callable[[list], None]:
        def take_batch(batch: list) -> None:  # called as lines arrive: no task switch per arrival
            t = now()
            got = False
            for ev in batch:
                if type(ev) is Msg:
                    if ev.kind != "text":
                        continue
                    if take(i, ev.text, t):
                        got = True
                        if hop is not None:
                            hop.append(wall() - ev.ts)
                elif type(ev) is Gap:
                    tally.gaps[i] += ev.last - ev.first + 1
            if got:
                last[i] = t

        return take_batch

    for i, c in enumerate(clients):
        c.listen(listener(i))  # what arrived during set-up (probes) first, then live
    base: list[int] | None = None  # recovered during set-up (probes before the subscription took) is not counted
    try:
        while not driver.step():
            if base is None and driver.phase == "run":
                base = [c.recovered for c in clients]
            await asyncio.sleep(0.02)
    finally:
        base = base or [c.recovered for c in clients]
        for i, c in enumerate(clients):
            tally.recovered[i] = c.recovered - base[i]
        expected = driver.expected.value
        for i, c in enumerate(clients):  # why a client fell short: for the report, not for control
            if i in tally.dead or (expected >= 0 and counts[i] >= expected):
                continue
            if len(tally.stuck) >= 5:
                break
            tracker = c._trackers.get(ROOM)
            failed = [repr(t.exception())[:200] for t in c._tasks if t.done() and not t.cancelled() and t.exception()]
            tally.stuck.append({
                "client": i, "count": counts[i], "state": c.state,
                "tracker": None if tracker is None else {"last": tracker.last, "known_head": tracker.known_head, "early": len(tracker.early)},
                "queued_events": c._events.qsize(), "dead_tasks": failed,
            })
        # No goodbyes: N clients saying bye would cost N*N/2 offline notices; the broker
        # is stopped right after the run anyway.


# ====================================================================== publishers


@dataclasses.dataclass
class PubPlan:
    mode: str  # "blast", "paced" or "none"
    budget: int = 0  # blast: most lines
    window: float = 0.0  # blast: most seconds
    rate: float = 0.0  # paced: lines per second
    seconds: float = 0.0  # paced: how long
    probe: float = 0.02  # seconds between readiness probes
    size: str = ""  # chat: the bench mode, for chat.SIZES


def publisher(system: str, ep: dict, idx: int, plan: PubPlan, ctl: Ctl, conn: Any) -> None:
    procs.raise_nofile()
    try:
        if base(system) == "zchat":
            import asyncio

            asyncio.run(_zchat_pub(ep, idx, plan, ctl, conn))
            return
        send = {"zmq-proxy": _zmq_pub, "py-forwarder": _zmq_pub, "redis": _redis_pub, "threaded": _threaded_pub}[system](ep, idx)
        ctl.ready.put(("pub", idx))
        # Probe only once every subscriber is connected: a PUB that keeps publishing while
        # thousands of SUBs connect makes libzmq's accepting crawl (measured: 10,000
        # connections in 12 s without traffic; stuck near 8,300 after a minute with a probe every 0.25 s).
        ctl.join_go.wait()
        while not ctl.probes_off.is_set():
            send.one(record(PROBE, 0))
            time.sleep(plan.probe)
        ctl.go.wait()
        gc.freeze()  # as in the subscribers: set-up objects are not scanned during the run
        n, t_first, cpu0 = 0, now(), time.process_time()
        if plan.mode == "blast":
            deadline = t_first + plan.window
            n = send.blast(idx, plan.budget, deadline)
        elif plan.mode == "paced":
            total, step = int(plan.rate * plan.seconds), 1.0 / plan.rate
            while n < total:
                due = t_first + n * step
                t = now()
                if t < due:
                    time.sleep(due - t)
                if not send.one(record(idx, n), deadline=now() + 5):
                    break
                n += 1
        ctl.results.put(("pub", idx, {"sent": n, "t_first": t_first, "t_end": now(), "cpu_s": time.process_time() - cpu0}))
        while True:
            cmd = conn.recv()
            if cmd == "flush":
                ok = send.one(record(FLUSH, n), deadline=now() + 2)  # a stuck server (threaded chat) stays stuck
                n += ok
                conn.send(n)
            else:
                break
        send.close()
    except Exception:
        _report_error(ctl, f"{system} publisher {idx}")
    time.sleep(0.2)


class _ZmqSend:
    def __init__(self, ep: dict, idx: int) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.sndhwm = HWM
        self.push.linger = 1000
        self.push.connect(ep["pull"])

    def one(self, data: bytes, deadline: float = 0.0) -> bool:
        self.push.send(data)
        return True

    def blast(self, idx: int, budget: int, deadline: float) -> int:
        send, n = self.push.send, 0
        while n < budget:
            for data in block(idx, n, now())[: budget - n]:
                send(data)
            n = min(budget, n + BLOCK)
            if now() > deadline:
                break
        return n

    def close(self) -> None:
        self.push.close()
        self.ctx.term()


def _zmq_pub(ep: dict, idx: int) -> _ZmqSend:
    return _ZmqSend(ep, idx)


class _RedisSend:
    def __init__(self, ep: dict, idx: int) -> None:
        import redis

        self.r = redis.Redis(host=ep["host"], port=ep["port"])
        self.r.ping()

    def one(self, data: bytes, deadline: float = 0.0) -> bool:
        self.r.publish(CHANNEL, data)
        return True

    def blast(self, idx: int, budget: int, deadline: float) -> int:
        pipe, n = self.r.pipeline(transaction=False), 0
        publish = pipe.publish
        while n < budget:
            records = block(idx, n, now())[: budget - n]
            for start in range(0, len(records), REDIS_PIPELINE):
                for data in records[start : start + REDIS_PIPELINE]:
                    publish(CHANNEL, data)
                pipe.execute()
            n += len(records)
            if now() > deadline:
                break
        return n

    def close(self) -> None:
        self.r.close()


def _redis_pub(ep: dict, idx: int) -> _RedisSend:
    return _RedisSend(ep, idx)


class _ThreadedSend:
    """A classic chat client: the name first, a reader thread, one sendall per line."""

    def __init__(self, ep: dict, idx: int) -> None:
        self.s = socket.create_connection((ep["host"], ep["port"]))
        self.s.sendall(f"pub{idx}".encode())
        time.sleep(0.1)  # so the name is not merged with the first line (no framing)
        self.s.settimeout(0.1)
        self.closed = False
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        while not self.closed:  # the other publishers' lines come back to us: read them
            try:
                if not self.s.recv(262144):
                    return
            except socket.timeout:
                continue
            except OSError:
                return

    def one(self, data: bytes, deadline: float = 0.0) -> bool:
        """Send every byte of one line; False if the server stopped reading past ``deadline``."""
        view, sent = memoryview(data), 0
        while sent < len(data):
            try:
                sent += self.s.send(view[sent:])
            except socket.timeout:
                if deadline and now() > deadline:
                    return False
        return True

    def blast(self, idx: int, budget: int, deadline: float) -> int:
        n, send = 0, self.one
        while n < budget:
            for data in block(idx, n, now())[: budget - n]:
                if not send(data, deadline):
                    return n
                n += 1
            if now() > deadline:
                break
        return n

    def close(self) -> None:
        self.closed = True
        self.s.close()


def _threaded_pub(ep: dict, idx: int) -> _ThreadedSend:
    return _ThreadedSend(ep, idx)


async def _settled(chunk: Any) -> int:
    """Wait for a chunk of lines given to ``post_many``: how many the broker stored."""
    from zchat.protocol import Stored

    outcomes = await chunk
    stored = sum(1 for outcome in outcomes if type(outcome) is Stored)
    if stored < len(outcomes):
        raise RuntimeError(f"the broker refused {len(outcomes) - stored} of {len(outcomes)} lines: {next(o for o in outcomes if type(o) is not Stored)}")
    return stored


async def _zchat_pub(ep: dict, idx: int, plan: PubPlan, ctl: Ctl, conn: Any) -> None:
    import asyncio

    from zchat.client import Client

    client = Client(ep["broker"], f"p{idx}", SECRET, label="bench")
    await client.connect(timeout=60)
    # Send-only, like every peer's publisher: a member (to send) that never reads the room.
    await client.join(ROOM, receive=False)

    async def discard() -> None:  # state changes and the like: nothing of the room comes
        async for _ in client.events():
            pass

    reader = asyncio.ensure_future(discard())
    ctl.ready.put(("pub", idx))
    while not ctl.join_go.is_set():
        await asyncio.sleep(0.005)
    while not ctl.probes_off.is_set():
        await client.send(ROOM, text(PROBE, 0))
        await asyncio.sleep(plan.probe)
    while not ctl.go.is_set():
        await asyncio.sleep(0.001)
    gc.freeze()
    sent, n, t_first, cpu0 = 0, 0, now(), time.process_time()
    if plan.mode == "blast":
        # post_many() a chunk per turn (one frame to the broker, one future), keep
        # ZCHAT_WINDOW lines in flight, and count a line as sent once the broker has
        # acked (stored) it.
        deadline, post_many, budget = t_first + plan.window, client.post_many, plan.budget
        inflight: collections.deque[asyncio.Future] = collections.deque()
        texts: list[str] = []
        while n < budget and now() < deadline:
            if not texts:
                texts = block(idx, n, now(), as_text=True)[: budget - n]
            chunk = texts[:ZCHAT_CHUNK]
            del texts[:ZCHAT_CHUNK]
            n += len(chunk)
            inflight.append(post_many(ROOM, chunk))
            if len(inflight) * ZCHAT_CHUNK >= ZCHAT_WINDOW:
                sent += await _settled(inflight.popleft())
            else:
                await asyncio.sleep(0)
        while inflight:
            sent += await _settled(inflight.popleft())
    elif plan.mode == "paced":
        total, step, pending = int(plan.rate * plan.seconds), 1.0 / plan.rate, []
        while n < total:
            due = t_first + n * step
            t = now()
            if t < due:
                await asyncio.sleep(due - t)
            pending.append(client.post(ROOM, text(idx, n)))
            n += 1
        await asyncio.gather(*pending)
        sent = n
    ctl.results.put(("pub", idx, {"sent": sent, "t_first": t_first, "t_end": now(), "cpu_s": time.process_time() - cpu0}))
    while True:
        while not conn.poll():
            await asyncio.sleep(0.005)
        cmd = conn.recv()
        if cmd != "flush":
            break
        await asyncio.wait_for(client.send(ROOM, text(FLUSH, sent)), 10)
        sent += 1
        conn.send(sent)
    reader.cancel()
    await client.close()
