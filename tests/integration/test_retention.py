"""Retention on real brokers: pruning observed through clients, pruned history reported
as a Gap, the broker's flags, and a broker that keeps serving while it prunes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import BrokerProcess, collect
from zchat import protocol as p
from zchat.recovery import Gap
from zchat.retention import Retention, RetentionPolicy
from zchat.storage.sqlite import SqliteStorage


async def test_pruned_history_is_a_gap_no_longer_in_history(connect, broker) -> None:
    """A reader away while retention pruned is told what it lost, then gets what is kept."""
    talker = await connect("talker")
    await talker.join("general")  # seq 1: the join line
    away = await connect("away")
    await away.join("general")  # seq 2
    cursors = away.cursors()
    await away.close()
    for i in range(20):  # seqs 3..22
        await talker.send("general", f"line {i}")
    retention = Retention(broker.broker.storage, RetentionPolicy(messages=5, batch=4, pause=0))
    assert await retention.pass_once() == 17
    assert await broker.broker.storage.first_seq("general") == 18
    back = await connect("away", cursors=cursors)
    await back.join("general")
    events = await collect(back, 6, kinds=(p.Msg, Gap), where=lambda e: isinstance(e, Gap) or e.kind == "text")
    gap = events[0]
    assert isinstance(gap, Gap), events
    assert (gap.room, gap.first, gap.last, gap.reason) == ("general", 3, 17, "no longer in history")
    assert [e.text for e in events[1:]] == [f"line {i}" for i in range(15, 20)]
    # a fresh reader asking for everything just gets what is kept
    assert [m.seq for m in await talker.history("general", limit=100)][:1] == [18]


async def test_broker_serves_while_retention_prunes_in_the_background(connect, broker) -> None:
    """Retention runs beside the loop as a task: pings are answered during a long pass and
    new lines keep their seqs (the head is never pruned)."""
    talker = await connect("talker")
    await talker.join("busy")
    await talker.history("busy", limit=1)
    storage = broker.broker.storage
    msgs = [p.Msg(room="busy", seq=s, id=f"x{s}", ts=time.time() - 10, sender="talker", text=f"old {s}") for s in range(2, 20_002)]
    # rows written behind the core's back: tell it the new head, as a restart would
    await storage.append(msgs)
    broker.core.heads["busy"] = 20_001
    retention = Retention(storage, RetentionPolicy(messages=100, batch=200, pause=0.002, every=3600))
    task = asyncio.create_task(retention.run())
    try:
        pings = 0
        while retention.passes == 0:
            await talker.ping()
            pings += 1
        assert pings > 1  # the loop answered while the pass was under way
        assert retention.pruned == 20_001 - 100
        stored = await talker.send("busy", "after pruning")
        assert stored.seq == 20_002
        seqs = [m.seq for m in await talker.history("busy", limit=1000)]
        assert seqs == list(range(19_902, 20_003))
    finally:
        task.cancel()


def test_broker_flags_prune_old_history_at_start(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """``zchat broker --retain-days 1 --retain-messages 50`` prunes on its first pass."""
    db = tmp_path / "old.db"

    async def fill() -> None:
        store = SqliteStorage(db)
        await store.open()
        now = time.time()
        old = [p.Msg(room="archive", seq=s, id=f"a{s}", ts=now - 3 * 86_400, sender="x", text="old") for s in range(1, 101)]
        recent = [p.Msg(room="archive", seq=s, id=f"a{s}", ts=now, sender="x", text="new") for s in range(101, 301)]
        await store.append(old + recent)
        await store.close()

    asyncio.run(fill())
    proc = BrokerProcess(db, cli_env, "--retain-days", "1", "--retain-messages", "50").start()
    try:
        deadline = time.monotonic() + 15
        while _first_seq(db) != 251:  # read beside the running broker (WAL: readers never block it)
            assert time.monotonic() < deadline, f"not pruned: first seq {_first_seq(db)}"
            time.sleep(0.02)  # polling interval
        done = subprocess.run(
            [sys.executable, "-m", "zchat", "tail", "-b", proc.endpoint, "-n", "reader", "-r", "archive",
             "--history", "500", "--json", "--count", "50", "--timeout", "10"],
            env=cli_env, capture_output=True, text=True, timeout=60,
        )
    finally:
        out = proc.stop()
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["seq"] for r in rows if r["kind"] == "text"] == list(range(251, 301))
    gaps = [r for r in rows if r["kind"] == "gap"]  # asked for 500: told the 250 before are gone
    assert [(g["first"], g["last"], g["reason"]) for g in gaps] == [(1, 250, "no longer in history")]
    assert "retention: keeping 1 days and 50 messages a room" in out, out
    assert "retention: pruned 250 messages in 1 rooms" in out, out


def _first_seq(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT MIN(seq) FROM messages").fetchone()[0] or 0


async def test_bad_retention_settings_are_refused(cli_env: dict[str, str], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zchat", "broker", "--db", str(tmp_path / "x.db"), "--retain-days", "-1"],
        env=cli_env, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2 and "retain_days" in done.stderr, done.stderr
    assert not (tmp_path / "x.db").exists()
