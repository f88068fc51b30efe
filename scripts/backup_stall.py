"""How long a running broker's loop stalls while ``zchat backup`` copies its history:
prints figures, asserts nothing.

usage: python scripts/backup_stall.py [--messages 100000] [--backups 3] [--rate 500]

A broker runs in this process on a history of N messages; a writer client in another
process sends --rate lines a second to it the whole time. A probe task on the broker's
event loop sleeps 2 ms again and again: how late it wakes is how long the loop was busy
(a broker turn, a storage append, a checkpoint catch-up). The longest and p99 lateness
are printed for a quiet stretch (the writer alone) and while ``zchat backup`` (a separate
process, as operators run it) copies the file, --backups times in a row; then for a
retention pass that prunes every room to --retain messages, on the broker's loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from zchat.broker import Broker
from zchat.client import Client
from zchat.core import Limits
from zchat.guard import GuardConfig
from zchat.protocol import Msg
from zchat.retention import Retention, RetentionPolicy
from zchat.storage.sqlite import SqliteStorage

PROBE = 0.002


async def writer(endpoint: str, rate: float) -> None:
    client = Client(endpoint, "writer", "secret-of-writer-0123456789")
    await client.connect()
    await client.join("busy")
    gap = 1.0 / rate
    n = 0
    next_at = time.monotonic()
    while True:
        client.post("busy", f"line {n} " + "x" * 60)
        n += 1
        next_at += gap
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


class Probe:
    def __init__(self) -> None:
        self.samples: list[float] = []

    async def run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(PROBE)
            self.samples.append(time.perf_counter() - t - PROBE)

    def window(self) -> list[float]:
        out, self.samples = sorted(self.samples), []
        return out


def show(label: str, lags: list[float]) -> None:
    if not lags:
        print(f"{label}: no samples")
        return
    p99 = lags[min(len(lags) - 1, int(0.99 * len(lags)))]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{label}: {len(lags)} probes, loop late by p50 {lags[len(lags) // 2] * 1000:.2f} ms, "
          f"p99 {p99 * 1000:.2f} ms, max {lags[-1] * 1000:.2f} ms (load average {load:.1f} on {os.cpu_count()} CPUs)")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--backups", type=int, default=3)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--quiet", type=float, default=3.0, help="seconds measured without a backup")
    ap.add_argument("--retain", type=int, default=1000, help="then prune to this many a room (0: skip)")
    ap.add_argument("--writer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.writer:
        await writer(args.writer, args.rate)
        return
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "history.db"
        store = SqliteStorage(db)
        await store.open()
        now = time.time()
        for start in range(0, args.messages, 1000):
            await store.append([
                Msg(room=f"room-{i % 10}", seq=i // 10 + 1, id=f"id-{i}", ts=now, sender="someone", text="y" * 80, cid=f"c{i}")
                for i in range(start, min(args.messages, start + 1000))
            ])
        await store.close()
        print(f"history: {args.messages} messages, {db.stat().st_size / 1e6:.1f} MB")
        broker = Broker("tcp://127.0.0.1:0", SqliteStorage(db), Limits(rate=0, heartbeat=5.0),
                        guard=GuardConfig(max_per_address=1000, claims_per_minute=0))
        await broker.start()
        task = asyncio.create_task(broker.run())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        feeder = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--writer", broker.endpoint, "--rate", str(args.rate), env=env)
        probe = Probe()
        probing = asyncio.create_task(probe.run())
        try:
            await asyncio.sleep(1.0)  # writer connected and going
            probe.window()
            await asyncio.sleep(args.quiet)
            show(f"writer at {args.rate:g} lines/s, no backup ({args.quiet:g}s)", probe.window())
            heads_before = dict(broker.core.heads)
            all_lags: list[float] = []
            for i in range(args.backups):
                out = Path(tmp) / f"copy-{i}.db"
                t0 = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "zchat", "backup", "--db", str(db), str(out), env=env,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                stdout, stderr = await proc.communicate()
                took = time.perf_counter() - t0
                lags = probe.window()
                all_lags += lags
                wal = Path(str(db) + "-wal")
                print(f"backup {i + 1}: exit {proc.returncode} in {took:.2f}s (process start included), "
                      f"{out.stat().st_size / 1e6:.1f} MB; WAL now {wal.stat().st_size / 1e6 if wal.exists() else 0:.1f} MB")
                if proc.returncode:
                    print(stderr.decode())
                show(f"  during backup {i + 1}", lags)
            show("during all backups", sorted(all_lags))
            stored = sum(broker.core.heads.values()) - sum(heads_before.values())
            print(f"lines stored while the backups ran: {stored}")
            if args.retain:
                # Retention beside the loop, as `zchat broker --retain-messages` runs it.
                retention = Retention(broker.storage, RetentionPolicy(messages=args.retain))
                t0 = time.perf_counter()
                probe.window()
                pruned = await retention.pass_once()
                took = time.perf_counter() - t0
                show(f"retention pass to {args.retain} a room: {pruned} pruned in {took:.2f}s, "
                     f"{retention.busy:.2f}s in prune calls, longest {retention.longest_batch * 1000:.2f} ms", probe.window())
        finally:
            probing.cancel()
            feeder.terminate()
            await feeder.wait()
            broker.stop()
            await asyncio.wait_for(task, 10)


if __name__ == "__main__":
    asyncio.run(main())
