"""``zchat backup`` against a running broker subprocess under traffic, and the restore:
a new broker started on the copy serves the history."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import BrokerProcess
from zchat.client import Client


def zchat(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zchat", *args], env=env, capture_output=True, text=True, timeout=60)


async def test_backup_of_a_busy_broker_restores_into_a_new_broker(tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = BrokerProcess(tmp_path / "live.db", cli_env, "--rate", "0").start()
    copy = tmp_path / "backups" / "copy.db"
    try:
        writer = Client(proc.endpoint, "writer", "secret-of-writer-0123456789")
        await writer.connect()
        await writer.join("general")
        acked = [await writer.send("general", f"before {i}") for i in range(200)]
        live_epoch = writer.epoch
        # keep writing while the backup runs: the copy is one consistent snapshot
        stop = asyncio.Event()

        async def keep_writing() -> int:
            n = 0
            while not stop.is_set():
                await writer.send("general", f"during {n}")
                n += 1
            return n

        busy = asyncio.create_task(keep_writing())
        backup = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "zchat", "backup", "--db", str(proc.db), str(copy), "--step-pages", "4",
            env=cli_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(backup.communicate(), 60)
        stop.set()
        during = await busy
        assert backup.returncode == 0, err.decode()
        assert "backed up" in out.decode()
        await writer.close()
    finally:
        proc.stop()
    assert during > 0
    with sqlite3.connect(copy) as conn:
        seqs = [s for (s,) in conn.execute("SELECT seq FROM messages WHERE room = 'general' ORDER BY seq")]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
    # every line acked before the backup began, and no hole: a snapshot, not a mix
    assert seqs == list(range(1, len(seqs) + 1))
    assert seqs[-1] >= acked[-1].seq
    assert not Path(str(copy) + "-wal").exists()

    # restore: a new broker on the copy reads the history; it is a new epoch
    restored = BrokerProcess(copy, cli_env, "--rate", "0").start()
    try:
        reader = Client(restored.endpoint, "reader", "secret-of-reader-0123456789")
        await reader.connect()
        first = await reader.history("general", limit=201, after=0)  # the join line, then 200
        assert [m.text for m in first if m.kind == "text"] == [f"before {i}" for i in range(200)]
        history = await reader.history("general", limit=1000)
        assert [m.seq for m in history] == seqs[-len(history):]
        assert reader.epoch != live_epoch
        # the restored broker takes new lines after the copy's head
        await reader.join("general")
        stored = await reader.send("general", "after restore")
        assert stored.seq == seqs[-1] + 2  # the reader's join line, then this
        await reader.close()
    finally:
        restored.stop()


def test_backup_refuses_bad_targets_and_redis(tmp_path: Path, cli_env: dict[str, str]) -> None:
    missing = zchat(cli_env, "backup", "--db", str(tmp_path / "none.db"), str(tmp_path / "out.db"))
    assert missing.returncode == 1 and "cannot read history" in missing.stderr
    foreign = tmp_path / "foreign.db"
    foreign.write_text("not sqlite")
    bad = zchat(cli_env, "backup", "--db", str(foreign), str(tmp_path / "out.db"))
    assert bad.returncode == 1 and "not an SQLite database" in bad.stderr
    assert not (tmp_path / "out.db").exists()
    redis = zchat({**cli_env, "ZCHAT_STORAGE": "redis://127.0.0.1:1"}, "backup", str(tmp_path / "out.db"))
    assert redis.returncode == 1 and "BGSAVE" in redis.stderr
