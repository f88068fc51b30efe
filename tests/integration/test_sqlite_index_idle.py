"""SQLite only: search indexing of a flood's big lines waits for the broker's idle
moments (SqliteStorage.idle), a batch at a time, bounded by INDEX_DEFER_BYTES; a
search still finds every stored line. Real files and a real broker on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import RunningBroker, wait_for
from zchat.client import Client
from zchat.core import Limits
from zchat.protocol import Msg
from zchat.storage import sqlite as sqlite_storage
from zchat.storage.sqlite import SqliteStorage

BIG = 32_000


def line(seq: int, size: int = BIG) -> Msg:
    text = f"word{seq} " + "y" * (size - 10)
    return Msg(room="busy", seq=seq, id=f"i{seq}", ts=1_700_000_000.0 + seq, sender="eve", text=text, cid=f"c{seq}")


def indexed(store: SqliteStorage) -> int:
    return store._db.execute("SELECT COALESCE(MAX(rowid), 0) FROM search_text").fetchone()[0]


async def test_big_lines_are_indexed_when_the_loop_is_idle_a_batch_at_a_time(tmp_path: Path) -> None:
    """fails on main (no idle(): every append that filled 64 KiB indexed it, in the
    turn that stored it: 75% of that turn's CPU). Now the appends store only; idle()
    indexes one batch (about INDEX_BATCH_BYTES) a call until none is full."""
    store = SqliteStorage(tmp_path / "h.db")
    await store.open()
    try:
        assert store.searchable
        assert store.idle() is False  # nothing waits; from now on full batches wait for it
        seq = 0
        for _ in range(30):  # 90 lines of 32 KB: 2.9 MB, under INDEX_DEFER_BYTES
            await store.append([line(seq + i) for i in (1, 2, 3)])
            seq += 3
            assert indexed(store) == 0  # stored, not yet indexed
        slices = 0
        while store.idle():
            slices += 1
            assert indexed(store) <= 2 * slices  # a batch: 64 KiB of 32 KB lines is 2
        assert slices >= 40
        assert seq - indexed(store) <= 2  # what is left is less than a batch
        found = await store.search("word90", limit=5)
        assert [m.seq for m in found] == [90]  # a search indexes the rest first
        assert indexed(store) == seq
    finally:
        await store.close()


async def test_what_waits_for_idle_is_bounded(tmp_path: Path) -> None:
    """A loop that is never idle: past INDEX_DEFER_BYTES the appends index again, the
    oldest batch each, so what waits stays about INDEX_DEFER_BYTES."""
    store = SqliteStorage(tmp_path / "h.db")
    await store.open()
    try:
        store.idle()
        cap = sqlite_storage.INDEX_DEFER_BYTES
        seq = 0
        while seq * BIG < 2 * cap:
            await store.append([line(seq + i) for i in (1, 2, 3)])
            seq += 3
            assert (seq - indexed(store)) * BIG <= cap + 4 * BIG
        assert indexed(store) > 0
    finally:
        await store.close()


async def test_the_broker_indexes_big_lines_between_turns(tmp_path: Path) -> None:
    """The broker calls its store's idle() whenever its loop has nothing to read: big
    lines a client stored are indexed without any search asking."""
    store = SqliteStorage(tmp_path / "h.db")
    running = await RunningBroker(tmp_path / "h.db", Limits(rate=0), storage=lambda: store).start()
    broker = running.broker
    assert broker is not None
    alice = Client(broker.address, "alice", "secret-of-alice-0123456789")
    await alice.connect()
    await alice.join("busy")
    try:
        for i in range(10):
            await alice.send("busy", f"word{i} " + "y" * BIG)
        # All but less than a batch (64 KiB: two of these lines) are indexed.
        await wait_for(lambda: store._deferring and indexed(store) >= 8, timeout=30, what="the broker's idle indexing")
    finally:
        await alice.close()
        await running.stop()
