"""What full-text search costs SQLite: appends without the FTS5 index and with it (kept
in a file of its own by a thread of its own, zchat/storage/sqlite_search.py), at
appends of ``--batch`` lines (1: a transaction a line, the broker's quiet path): lines a
second until a search finds the last, the appending thread's CPU a line (the broker's
thread), the other threads' (the index and checkpoint threads); the time of a search,
and the files' sizes. Prints figures; asserts nothing.

    python scripts/measure_search.py [--lines 100000] [--batch 100 1]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from zchat.protocol import Msg
from zchat.storage.sqlite import SqliteStorage
from zchat.storage.sqlite_search import index_path


def lines(count: int) -> list[Msg]:
    words = "deploy staging lunch review release merge coffee build alpha beta".split()
    return [
        Msg(room=f"r{i % 47}", seq=i // 47 + 1, id=str(i), ts=float(i), sender="bob",
            text=f"{words[i % 10]} number {i} {words[(i * 7) % 10]} lorem ipsum dolor sit amet")
        for i in range(count)
    ]


async def append_rate(path: Path, msgs: list[Msg], batch: int, search: bool) -> tuple[float, float, float]:
    """Lines a second (wall clock, until a search finds the last line), this thread's
    CPU a line and the other threads' (both in microseconds)."""
    store = SqliteStorage(path, search=search)
    await store.open()
    began, cpu, proc = time.perf_counter(), time.thread_time(), time.process_time()
    for i in range(0, len(msgs), batch):
        await store.append(msgs[i : i + batch])
    if search:
        await store.search("deploy", 1)  # waits for the index thread to have every line
    elapsed, cpu, proc = time.perf_counter() - began, time.thread_time() - cpu, time.process_time() - proc
    await store.close()
    return len(msgs) / elapsed, cpu / len(msgs) * 1e6, (proc - cpu) / len(msgs) * 1e6


def size(path: Path) -> float:
    return sum(p.stat().st_size for p in (path, index_path(path)) if p.exists()) / 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1], help="lines an append")
    args = parser.parse_args()
    msgs = lines(args.lines)
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch:
            for search in (False, True):
                path = Path(tmp) / f"{batch}-{search}.db"
                rate, cpu, others = await append_rate(path, msgs, batch, search)
                mode = "with the search index" if search else "without the search index"
                print(f"append, {batch} lines a transaction, {mode}: {rate:,.0f} lines/s, {cpu:.1f} us CPU a line on the "
                      f"appending thread, {others:.1f} us on the others, files {size(path):.1f} MB", flush=True)
        store = SqliteStorage(Path(tmp) / f"{args.batch[0]}-True.db")
        await store.open()
        for query, kwargs in (("deploy", {}), ("deploy", {"room": "r7"}), ("deploy", {"readable": lambda r: r == "r7"}),
                              ("coffee number 4*", {}), ("nothing-like-this", {})):
            began = time.perf_counter()
            for _ in range(20):
                found = await store.search(query, 50, **kwargs)  # type: ignore[arg-type]
            ms = (time.perf_counter() - began) / 20 * 1000
            print(f"search {query!r} {sorted(kwargs) or ''}: {len(found)} lines in {ms:.2f} ms")
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())
