"""Disk (SQLite) and memory (Redis) cost of history per million messages, and what
retention pruning costs: prints figures, asserts nothing.

usage: python scripts/storage_cost.py [--messages N] [--text-bytes B] [--rooms R] [--redis]

Messages look like chat: B bytes of text, a cid, a 12-character sender, broker-made ids;
written in batches of 128 like the broker's turns. With --redis a throwaway
redis-server (no persistence) on a free loopback port is measured too (used_memory).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import string
import subprocess
import tempfile
import time
from pathlib import Path

from zchat.protocol import Msg
from zchat.storage import Storage
from zchat.storage.sqlite import SqliteStorage


def messages(n: int, text_bytes: int, rooms: int) -> list[list[Msg]]:
    rng = random.Random(1)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(2000)]
    seqs = [0] * rooms
    batches, batch = [], []
    now = time.time()
    for i in range(n):
        room = i % rooms
        seqs[room] += 1
        text = ""
        while len(text) < text_bytes:
            text += rng.choice(words) + " "
        batch.append(Msg(
            room=f"room-{room}", seq=seqs[room], id=f"5f3a9c1e-{i:x}", ts=now - n + i, sender=f"user-{i % 97:07d}",
            text=text[:text_bytes], cid=f"{rng.getrandbits(64):016x}",
        ))
        if len(batch) == 128:
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    return batches


async def fill(store: Storage, batches: list[list[Msg]]) -> float:
    await store.open()
    t0 = time.perf_counter()
    for batch in batches:
        await store.append(batch)
    return time.perf_counter() - t0


async def prune_cost(store: Storage, rooms: int, keep_fraction: float, batch: int) -> tuple[int, float, list[float]]:
    """Prune every room down to keep_fraction of it; (deleted, seconds, each batch's seconds sorted)."""
    heads = await store.heads()
    deleted, calls = 0, []
    t0 = time.perf_counter()
    for room, head in heads.items():
        keep = max(1, int(head * keep_fraction))
        while True:
            s = time.perf_counter()
            n = await store.prune(room, keep=keep, batch=batch)
            calls.append(time.perf_counter() - s)
            if not n:
                break
            deleted += n
            await asyncio.sleep(0.001)  # as Retention pauses: lets the checkpoint thread run
    return deleted, time.perf_counter() - t0, sorted(calls)


def spread(calls: list[float]) -> str:
    def at(q: float) -> float:
        return calls[min(len(calls) - 1, int(q * len(calls)))] * 1000

    return f"p50 {at(0.5):.2f} ms, p99 {at(0.99):.2f} ms, max {calls[-1] * 1000:.2f} ms"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--text-bytes", type=int, default=80)
    ap.add_argument("--rooms", type=int, default=20)
    ap.add_argument("--redis", action="store_true")
    ap.add_argument("--batch", type=int, default=500, help="rows a prune call deletes (RetentionPolicy.batch)")
    args = ap.parse_args()
    n = args.messages
    batches = messages(n, args.text_bytes, args.rooms)
    per_million = 1_000_000 / n
    print(f"{n} messages of {args.text_bytes} bytes of text in {args.rooms} rooms")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.db"
        store = SqliteStorage(path)
        seconds = await fill(store, batches)
        await store.close()  # folds the WAL in: the file alone
        size = path.stat().st_size
        print(f"sqlite: {size / 1e6:.1f} MB file, {size / n:.0f} bytes a message, "
              f"{size * per_million / 1e6:.0f} MB per million messages (written at {n / seconds:,.0f} msgs/s)")
        store = SqliteStorage(path)
        await store.open()
        deleted, took, calls = await prune_cost(store, args.rooms, 0.5, args.batch)
        await store.close()
        after = path.stat().st_size
        print(f"sqlite prune of half: {deleted} messages in {took:.2f}s ({deleted / took:,.0f} msgs/s); a "
              f"{args.batch}-row batch: {spread(calls)}; file stays {after / 1e6:.1f} MB (freed pages are reused)")
    if args.redis:
        exe = shutil.which("redis-server")
        if exe is None:
            print("redis: redis-server not installed")
            return
        from zchat.storage.redis import RedisStorage

        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                     "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                import redis

                client = redis.Redis(port=port)
                deadline = time.monotonic() + 10
                while True:
                    try:
                        client.ping()
                        break
                    except redis.ConnectionError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)  # polling interval
                before = client.info("memory")["used_memory"]
                store = RedisStorage(f"redis://127.0.0.1:{port}")
                seconds = await fill(store, batches)
                used = client.info("memory")["used_memory"] - before
                print(f"redis: {used / 1e6:.1f} MB used_memory, {used / n:.0f} bytes a message, "
                      f"{used * per_million / 1e6:.0f} MB per million messages (written at {n / seconds:,.0f} msgs/s; "
                      f"the 10,000-message dedup list included)")
                deleted, took, calls = await prune_cost(store, args.rooms, 0.5, args.batch)
                print(f"redis prune of half: {deleted} messages in {took:.2f}s; a {args.batch}-row batch: {spread(calls)}")
                await store.close()
                client.close()
            finally:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    asyncio.run(main())
