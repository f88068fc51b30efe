"""SQLite only: checkpoints off the broker's thread, the WAL's size, durability, recent().

Real files, real threads, a real kill -9; waits poll with a deadline, nothing is timed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from zchat.protocol import Msg
from zchat.storage import sqlite as sqlite_storage
from zchat.storage.sqlite import SqliteStorage

DEADLINE = 60.0


def msg(room: str, seq: int, size: int = 1000, **kw: object) -> Msg:
    fields: dict = {"id": f"{room}-{seq}", "ts": 1_700_000_000.0 + seq, "sender": "alice", "text": "x" * size}
    fields.update(kw)
    return Msg(room=room, seq=seq, **fields)


def wal_of(store: SqliteStorage) -> Path:
    return Path(f"{store.path}-wal")


def checkpointer(store: SqliteStorage) -> sqlite_storage._Checkpointer:
    assert store._checkpointer is not None
    return store._checkpointer


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.01)  # poll interval


def other_close(db: Path) -> None:
    """Open and close the database in another process (as the sqlite3 CLI would)."""
    code = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('SELECT 1 FROM meta').fetchall(); c.close()"
    subprocess.run([sys.executable, "-c", code, str(db)], check=True, timeout=60)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


def checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sqlite-checkpoint")]


# ------------------------------------------------------------- checkpoints


async def test_broker_connection_leaves_checkpoints_to_the_thread(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "h.db")
    await store.open()
    try:
        assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        assert checkpointer(store).is_alive()
    finally:
        await store.close()


async def test_wal_starts_over_once_writes_pause(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "h.db")
    await store.open()
    try:
        for seq in range(1, 401, 20):
            await store.append([msg("dev", s) for s in range(seq, seq + 20)])
        ck = checkpointer(store)
        # Idle after a checkpoint that began after the last write: all of the WAL is copied.
        await until(lambda: ck.checkpoints >= 1 and ck.idle and ck.written == 400, "a checkpoint, then idle")
        grown = wal_of(store).stat().st_size
        await store.append([msg("dev", 401)])
        # The write started the WAL over from its beginning instead of appending to it.
        assert wal_of(store).stat().st_size <= grown
        assert (await store.last("dev", 1))[0].seq == 401
    finally:
        await store.close()


async def test_few_writes_wait_for_one_checkpoint(tmp_path: Path) -> None:
    """fails on main: a checkpoint every 0.25 s while anything was written, so a user's
    10 lines a second made 3-4 full checkpoints a second, each making the broker's next
    commit start the WAL over (an fdatasync of the WAL header on the broker's thread)."""
    store = SqliteStorage(tmp_path / "h.db")
    await store.open()
    try:
        ck = checkpointer(store)
        began = time.monotonic()
        for seq in range(1, 11):  # a normal user's pace: one short line every 0.1 s
            await store.append([msg("dev", seq, size=20)])
            await asyncio.sleep(0.1)  # the workload's pace, not a wait for an event
        took = time.monotonic() - began
        assert ck.checkpoints <= 1 + int(took / 2.0), (ck.checkpoints, took)  # main: 4 in 1 s
        await until(lambda: ck.checkpoints >= 1 and ck.idle, "the checkpoint after the writes")
        assert (await store.last("dev", 1))[0].seq == 10
    finally:
        await store.close()


async def test_much_written_is_checkpointed_without_waiting_for_the_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fails on main (no byte trigger: it waits the whole period): once the broker wrote
    CHECKPOINT_BYTES, the thread copies them back at once, so a burst never waits a
    whole CHECKPOINT_EVERY to be copied and the WAL stays bounded by bytes, not time."""
    monkeypatch.setattr(sqlite_storage, "CHECKPOINT_EVERY", 600.0)
    store = SqliteStorage(tmp_path / "h.db")
    await store.open()
    try:
        ck = checkpointer(store)
        big = 128 * 1024
        for seq in range(1, 41, 4):  # 40 lines of 128 KiB: 5 MiB, past CHECKPOINT_BYTES (4 MiB)
            await store.append([msg("dev", s, size=big) for s in range(seq, seq + 4)])
        await until(lambda: ck.checkpoints >= 1, "a checkpoint long before the period")
    finally:
        await store.close()


async def test_wal_stays_bounded_under_writes_that_never_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 64 * 1024
    monkeypatch.setattr(sqlite_storage, "WAL_LIMIT_BYTES", limit)
    monkeypatch.setattr(sqlite_storage, "HANDOFF_BYTES", 16 * 1024)
    store = SqliteStorage(tmp_path / "h.db")
    await store.open()
    ck = checkpointer(store)
    seq = 0
    try:
        deadline = time.monotonic() + DEADLINE
        # Back-to-back commits rarely leave the thread a moment in which the whole WAL is
        # copied, so the WAL passes the limit and the broker's thread is asked to finish.
        # A catch-up copies everything, so the next write starts the WAL over and SQLite
        # trims the file to journal_size_limit (4 * WAL_LIMIT_BYTES); unless the search
        # index thread was reading the history just then (it reads for a moment a pass),
        # and the next catch-up does it.
        while True:
            assert time.monotonic() < deadline, "the WAL was never handed back to the broker's thread, or never started over"
            catch_ups = ck.catch_ups
            await store.append([msg("dev", s) for s in range(seq + 1, seq + 21)])
            seq += 20
            if ck.catch_ups > catch_ups >= 1:
                await store.append([msg("dev", seq + 1)])
                seq += 1
                if wal_of(store).stat().st_size <= 4 * limit:
                    break
        assert ck.checkpoints >= 2
    finally:
        await store.close()
    reopened = SqliteStorage(tmp_path / "h.db")
    await reopened.open()
    try:
        assert await reopened.heads() == {"dev": seq}
        assert await reopened.first_seq("dev") == 1
    finally:
        await reopened.close()


async def test_close_stops_the_thread_and_truncates_the_wal(tmp_path: Path) -> None:
    before = set(checkpoint_threads())
    fds = open_fds()
    store = SqliteStorage(tmp_path / "h.db")
    await store.open()
    thread = checkpointer(store)
    for seq in range(1, 1001, 100):
        await store.append([msg("dev", s, cid=f"c{s}") for s in range(seq, seq + 100)])
    other_close(store.path)  # another process comes and goes: our WAL stays
    assert wal_of(store).exists()
    await store.add_user("alice", b"digest")
    await store.set_member("dev", "alice", True)
    await store.append([msg("ops", 1, cid="last", ts=1_700_001_001.0)])  # written just before close
    await store.close()
    assert not thread.is_alive()
    assert set(checkpoint_threads()) <= before
    assert open_fds() <= fds
    wal = wal_of(store)
    assert not wal.exists() or wal.stat().st_size == 0
    # The main file alone holds everything.
    alone = tmp_path / "alone" / "h.db"
    alone.parent.mkdir()
    shutil.copy(store.path, alone)
    raw = sqlite3.connect(alone)
    assert raw.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1001
    raw.close()

    store = SqliteStorage(tmp_path / "h.db")
    await store.open()
    try:
        assert await store.heads() == {"dev": 1000, "ops": 1}
        assert [m.cid for m in await store.recent(2)] == ["c1000", "last"]
        assert await store.get_user("alice") == b"digest"
        assert await store.members() == {"dev": {"alice"}}
    finally:
        await store.close()


async def test_a_failing_checkpointer_is_logged_and_sqlite_checkpoints_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: object, conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setattr(sqlite_storage._Checkpointer, "_loop", broken)
    store = SqliteStorage(tmp_path / "h.db")
    with caplog.at_level(logging.ERROR, logger="zchat.storage.sqlite"):
        await store.open()
        ck = checkpointer(store)
        await until(lambda: not ck.is_alive(), "the checkpoint thread to give up")
    assert "checkpoint thread failed" in caplog.text
    try:
        await store.append([msg("dev", 1)])  # the broker's thread takes over: no exception
        assert store._checkpointer is None
        assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
        await store.append([msg("dev", 2)])
        assert [m.seq for m in await store.range("dev", 0, 10)] == [1, 2]
        # The thread closed nothing of the file that held this process's locks: another
        # process that closes the last connection it sees must still leave our WAL alone.
        other_close(store.path)
        assert wal_of(store).exists()
        await store.append([msg("dev", 3)])
        assert await store.heads() == {"dev": 3}
    finally:
        await store.close()
    assert not wal_of(store).exists() or wal_of(store).stat().st_size == 0


_KILLED_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from zchat.protocol import Msg
    from zchat.storage.sqlite import SqliteStorage

    async def main():
        store = SqliteStorage(sys.argv[1])
        await store.open()
        for seq in range(1, 301):
            await store.append([Msg(room="dev", seq=seq, id=f"i{seq}", ts=1.7e9 + seq,
                                    sender="alice", text="x" * 2000, cid=f"c{seq}")])
        print("appended", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


async def test_committed_appends_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line.strip() == "appended", proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()  # SIGKILL: no close, no final checkpoint
        proc.communicate()
    store = SqliteStorage(db)
    await store.open()
    try:
        assert await store.heads() == {"dev": 300}
        assert [m.seq for m in await store.range("dev", 0, 1000)] == list(range(1, 301))
    finally:
        await store.close()


# ------------------------------------------------------------------ recent


# The schema and recent() query of the previous version: a partial index on ts.
_OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE messages (
    room TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, ts REAL NOT NULL, sender TEXT NOT NULL,
    kind TEXT NOT NULL, text TEXT NOT NULL, to_name TEXT NOT NULL, cid TEXT NOT NULL,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
CREATE INDEX messages_recent ON messages (ts) WHERE cid <> '';
CREATE TABLE users (name TEXT PRIMARY KEY, digest BLOB NOT NULL);
CREATE TABLE members (room TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (room, name)) WITHOUT ROWID;
"""
_COLUMNS = "room, seq, id, ts, sender, kind, text, to_name, cid"
_OLD_RECENT = f"SELECT {_COLUMNS} FROM messages WHERE cid <> '' ORDER BY ts DESC LIMIT ?"


def _history(seed: int, count: int) -> list[tuple]:  # type: ignore[type-arg]
    """Rows over many rooms (one busy), DMs, rows without a cid, and many equal ts."""
    rnd = random.Random(seed)
    rooms = ["dev", "devops", "ops", "@alice:bob", "@bob:carol"] + [f"r{i:02d}" for i in range(60)]
    weights = [40, 5, 5, 3, 3] + [1] * 60
    seqs: dict[str, int] = {}
    last_ts: dict[str, float] = {}
    rows = []
    clock = 1_700_000_000.0
    for i in range(count):
        room = rnd.choices(rooms, weights)[0]
        seq = seqs[room] = seqs.get(room, 0) + 1
        clock += rnd.choice([0.0, 0.0, 0.25, 1.0])  # coarse steps: ties across and within rooms
        ts = max(clock, last_ts.get(room, 0.0))
        last_ts[room] = ts
        kind = rnd.choice(["text", "text", "text", "me", "join"])
        cid = "" if kind == "join" or rnd.random() < 0.05 else f"c{i}"
        rows.append((room, seq, f"id{i}", ts, "alice", kind, f"m{i}", "", cid))
    return rows


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_recent_returns_what_the_old_ts_index_returned(tmp_path: Path, seed: int) -> None:
    db = tmp_path / "old.db"
    rows = _history(seed, 4000)
    with_cid = sum(1 for row in rows if row[8])
    limits = [1, 2, 3, 10, 99, 500, with_cid - 1, with_cid, with_cid + 50, 10_000]
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.executescript(_OLD_SCHEMA)
    raw.execute("INSERT INTO meta VALUES ('epoch', 'e0')")
    rnd = random.Random(seed)
    rnd.shuffle(rows)  # insertion order must not matter
    raw.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    raw.commit()
    plan = " ".join(str(r) for r in raw.execute("EXPLAIN QUERY PLAN " + _OLD_RECENT, (10,)))
    assert "messages_recent" in plan
    before = {limit: raw.execute(_OLD_RECENT, (limit,)).fetchall()[::-1] for limit in limits}
    raw.close()

    store = SqliteStorage(db)
    assert await store.open() == "e0"
    try:
        assert store._db.execute("SELECT name FROM sqlite_master WHERE name = 'messages_recent'").fetchall() == []
        for limit in limits:
            got = await store.recent(limit)
            expected = [sqlite_storage._row_to_msg((*row, 0, 0)) for row in before[limit]]  # no ref, never edited
            assert got == expected, f"limit {limit}"
        assert len(await store.recent(10_000)) == with_cid
    finally:
        await store.close()


async def test_recent_skips_rooms_without_a_cid_and_empty_history(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "h.db")
    await store.open()
    try:
        assert await store.recent(10) == []
        await store.append([msg("dev", 1, 10, kind="join"), msg("ops", 1, 10, kind="join")])
        assert await store.recent(10) == []
        await store.append([msg("ops", 2, 10, cid="a"), msg("ops", 3, 10, kind="part")])
        assert [(m.room, m.seq) for m in await store.recent(10)] == [("ops", 2)]
    finally:
        await store.close()
