"""What full-text search costs SQLite: append rate with and without the FTS5 index, the
time of a search, and the file size. Prints figures; asserts nothing.

    python scripts/measure_search.py [--lines 100000] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from zchat.protocol import Msg
from zchat.storage.sqlite import SqliteStorage


def lines(count: int) -> list[Msg]:
    words = "deploy staging lunch review release merge coffee build alpha beta".split()
    return [
        Msg(room=f"r{i % 47}", seq=i // 47 + 1, id=str(i), ts=float(i), sender="bob",
            text=f"{words[i % 10]} number {i} {words[(i * 7) % 10]} lorem ipsum dolor sit amet")
        for i in range(count)
    ]


async def append_rate(path: Path, msgs: list[Msg], batch: int, search: bool) -> float:
    store = SqliteStorage(path)
    await store.open()
    store.searchable = search  # off: the appends of a build without the index
    began = time.perf_counter()
    for i in range(0, len(msgs), batch):
        await store.append(msgs[i : i + batch])
    elapsed = time.perf_counter() - began
    await store.close()
    return len(msgs) / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    msgs = lines(args.lines)
    with tempfile.TemporaryDirectory() as tmp:
        for search in (False, True):
            path = Path(tmp) / f"{'fts' if search else 'plain'}.db"
            rate = await append_rate(path, msgs, args.batch, search)
            print(f"append, batches of {args.batch}, {'with' if search else 'without'} the search index: {rate:,.0f} lines/s, "
                  f"file {os.path.getsize(path) / 1e6:.1f} MB")
        store = SqliteStorage(Path(tmp) / "fts.db")
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
