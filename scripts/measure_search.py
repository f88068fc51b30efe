"""What full-text search costs SQLite: append rate without the FTS5 index, with it kept
in every append's transaction (``index_batch`` 1, as before) and with it batched (the
default, INDEX_BATCH lines a transaction), at appends of ``--batch`` lines (1: a
transaction a line, the broker's quiet path); the time of a search, and the file size.
Prints figures; asserts nothing.

    python scripts/measure_search.py [--lines 100000] [--batch 100 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from zchat.protocol import Msg
from zchat.storage.sqlite import INDEX_BATCH, SqliteStorage

#: name -> (searchable, index_batch)
MODES = {"without the search index": (False, 1), "index in every append": (True, 1), f"index {INDEX_BATCH} lines at a time": (True, INDEX_BATCH)}


def lines(count: int) -> list[Msg]:
    words = "deploy staging lunch review release merge coffee build alpha beta".split()
    return [
        Msg(room=f"r{i % 47}", seq=i // 47 + 1, id=str(i), ts=float(i), sender="bob",
            text=f"{words[i % 10]} number {i} {words[(i * 7) % 10]} lorem ipsum dolor sit amet")
        for i in range(count)
    ]


async def append_rate(path: Path, msgs: list[Msg], batch: int, search: bool, index_batch: int) -> tuple[float, float]:
    """Lines a second (wall clock, the close's last index batch included) and this
    thread's CPU per line in microseconds (the checkpoint thread's excluded)."""
    store = SqliteStorage(path)
    await store.open()
    store.searchable = search  # off: the appends of a build without the index
    store.index_batch = index_batch
    began, cpu = time.perf_counter(), time.thread_time()
    for i in range(0, len(msgs), batch):
        await store.append(msgs[i : i + batch])
    await store.search("deploy", 1) if search else None  # indexes the last batch
    elapsed, cpu = time.perf_counter() - began, time.thread_time() - cpu
    await store.close()
    return len(msgs) / elapsed, cpu / len(msgs) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1], help="lines an append")
    args = parser.parse_args()
    msgs = lines(args.lines)
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch:
            for n, (mode, (search, index_batch)) in enumerate(MODES.items()):
                path = Path(tmp) / f"{batch}-{n}.db"
                rate, cpu = await append_rate(path, msgs, batch, search, index_batch)
                print(f"append, {batch} lines a transaction, {mode}: {rate:,.0f} lines/s, {cpu:.1f} us CPU a line, "
                      f"file {os.path.getsize(path) / 1e6:.1f} MB", flush=True)
        store = SqliteStorage(Path(tmp) / f"{args.batch[0]}-2.db")
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
