#!/usr/bin/env python3
"""The client library's CPU per posted line (issue 15), printed, never asserted.

``python scripts/client_cpu.py publisher [--lines N] [--read] [--post]``: one ``Client``
flat out against a bench broker (CURVE, its own process), in the bench publisher's shape
(256 lines a chunk, 4,096 in flight): this process's CPU per line, all threads and per
thread (libzmq's I/O thread does CURVE). Default: send-only (``join(receive=False)``)
with ``post_many``; ``--read`` joins to receive (and reads the room back), ``--post``
posts line by line.

``python scripts/client_cpu.py library [--post]``: the library alone, no network: the
lines go to a fake socket, the broker's acks are built outside the measured CPU, decoded
and settled; thread CPU per line for posting, packing frames and taking the acks.

Both measure CPU, not time, so a busy machine blurs them less than a throughput; still,
alternate before/after runs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zchat import protocol as p
from zchat.bench import procs, servers
from zchat.bench.common import ROOM, SECRET, block
from zchat.bench.scenarios import member_seed

CHUNK, WINDOW = 256, 4096


def _threads() -> dict[str, float]:
    """CPU seconds of each thread of this process, by name (/proc/self/task)."""
    ticks, out = os.sysconf("SC_CLK_TCK"), {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            continue  # the thread ended meanwhile
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


async def _publisher(broker: str, lines: int, read: bool, one_by_one: bool) -> None:
    from zchat.client import Client

    client = Client(broker, "p0", SECRET, label="bench")
    await client.connect(timeout=60)
    await client.join(ROOM, receive=read)

    async def discard() -> None:
        async for _ in client.events():
            pass

    reader = asyncio.ensure_future(discard())
    await client.send(ROOM, "warm-up")
    gc.freeze()
    before, cpu0, wall0 = _threads(), time.process_time(), time.perf_counter()
    inflight: collections.deque[list[asyncio.Future]] = collections.deque()
    texts: list[str] = []
    n = 0
    while n < lines:
        if not texts:
            texts = block(0, n, time.time(), as_text=True)[: lines - n]
        part = texts[:CHUNK]
        del texts[:CHUNK]
        n += len(part)
        inflight.append([client.post(ROOM, t) for t in part] if one_by_one else [client.post_many(ROOM, part)])
        if len(inflight) * CHUNK >= WINDOW:
            for fut in inflight.popleft():
                await fut
        else:
            await asyncio.sleep(0)
    while inflight:
        for fut in inflight.popleft():
            await fut
    cpu, wall, after = time.process_time() - cpu0, time.perf_counter() - wall0, _threads()
    per = ", ".join(f"{name} {1e6 * (after[name] - before.get(name, 0.0)) / n:.2f}" for name in after)
    how = f"{'joined to read' if read else 'send-only'}, {'post' if one_by_one else 'post_many'}"
    print(f"publisher ({how}): {n:,} lines in {wall:.2f} s = {n / wall:,.0f} lines/s; "
          f"CPU {1e6 * cpu / n:.2f} µs a line (per thread: {per})")
    reader.cancel()
    await client.close()


class _FakeSocket:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, data: bytes, flags: int = 0) -> None:
        self.frames.append(data)


class _FakePump:
    """Stands in for the DEALER's pump: operations run when ``run()`` is called."""

    def __init__(self) -> None:
        self.sock = _FakeSocket()
        self.ops: list = []

    def submit(self, op) -> None:  # type: ignore[no-untyped-def]
        self.ops.append(op)

    def send_now(self, data: bytes) -> bool:
        return False

    def run(self) -> None:
        ops, self.ops = self.ops, []
        for op in ops:
            op(self.sock)


async def _library(chunks: int, one_by_one: bool) -> None:
    from zchat.client import Client

    client = Client("tcp://127.0.0.1:1", "p0", "secret-of-p0-0123456789")
    pump = client._dealer = _FakePump()  # type: ignore[assignment]
    texts = [f"p0|{i:09d}|" + "x" * 86 for i in range(CHUNK)]
    cpu = {"posting": 0.0, "packing frames": 0.0, "taking acks": 0.0}
    clock, seq = time.thread_time, 0
    for _ in range(chunks):
        t0 = clock()
        futures = [client.post(ROOM, t) for t in texts] if one_by_one else [client.post_many(ROOM, texts)]
        t1 = clock()
        pump.run()
        cpu["packing frames"] += clock() - t1
        cpu["posting"] += t1 - t0
        acks = []  # the broker's part: not measured
        for frame in pump.sock.frames:
            body = p.decode_router(frame, limit=len(frame))
            sends = body.items if isinstance(body, p.Sends) else [body]
            acks.append(p.encode(p.Ack(stored=[p.Stored(s.cid, ROOM, (seq := seq + 1), f"id{seq}", 1.0) for s in sends])))
        pump.sock.frames.clear()
        t2 = clock()
        for ack in acks:
            client._on_reply([ack])
        cpu["taking acks"] += clock() - t2
        assert all(f.done() for f in futures)
    lines = chunks * CHUNK
    parts = ", ".join(f"{k} {1e6 * v / lines:.2f}" for k, v in cpu.items())
    print(f"library ({'post' if one_by_one else 'post_many'}), no network: {1e6 * sum(cpu.values()) / lines:.2f} µs a line ({parts})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("publisher", "library"))
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--read", action="store_true", help="publisher: join to receive the room (and read it back)")
    parser.add_argument("--post", action="store_true", help="post line by line instead of post_many")
    args = parser.parse_args()
    if args.what == "library":
        asyncio.run(_library(max(1, args.lines // CHUNK), args.post))
        return 0
    procs.raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="zchat-client-cpu-"))
    server = servers.start_zchat(tmp, 5.0, seed=member_seed(["p0"]))
    try:
        asyncio.run(_publisher(server.endpoints["broker"], args.lines, args.read, args.post))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
