"""A full disk on a real broker: SQLite's ``max_page_count`` caps the history file (set on
the broker's own connection, then raised, as freeing disk space would), and a real
small filesystem (a tmpfs this test mounts, where it may). Sends are
refused with storage_unavailable and nothing unstored is acked; reads go on; the
broker logs the outage at most once a second and recovers by itself."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import RunningBroker, chat, wait_for
from tests.integration.test_limits import RawPeer
from zchat import protocol as p
from zchat.core import Limits


def cap_pages(broker, extra: int) -> int:  # type: ignore[no-untyped-def]
    """Let the broker's file grow by ``extra`` pages at most (0: not at all)."""
    db = broker.broker.storage._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    return db.execute(f"PRAGMA max_page_count={pages + extra}").fetchone()[0]


BIG = "x" * 30_000  # overflow pages: every such line needs new pages


async def test_disk_full_refuses_sends_clearly_keeps_reads_and_recovers(connect, broker, caplog) -> None:
    caplog.set_level(logging.INFO, logger="zchat.broker")
    reader = await connect("reader")
    await reader.join("room")
    peer = RawPeer(broker, "writer", "writer-1")
    try:
        assert isinstance(await peer.ask(p.Hello(rid=1)), p.Welcome)
        assert isinstance(await peer.ask(p.Join(rid=2, room="room")), p.Joined)
        assert isinstance(await peer.ask(p.Send(sid="writer-1", cid="c0", text="before", room="room")), p.Ack)
        await chat(reader, 1)
        cap_pages(broker, 0)
        started = time.monotonic()
        errors = []
        for i in range(1, 31):
            reply = await peer.ask(p.Send(sid="writer-1", cid=f"c{i}", text=BIG, room="room"))
            assert isinstance(reply, p.Error), reply  # nothing acked that is not stored
            errors.append(reply)
        elapsed = time.monotonic() - started
        assert {(e.code, e.cid) for e in errors} == {(p.ErrorCode.STORAGE_UNAVAILABLE, f"c{i}") for i in range(1, 31)}
        # reads go on: history, who, ping
        assert [m.text for m in await reader.history("room", limit=10) if m.kind == "text"] == ["before"]
        await reader.ping()
        assert isinstance(await peer.ask(p.Ping(rid=3)), p.Pong)
        outage_logs = [r for r in caplog.records if "storage unavailable" in r.getMessage()]
        assert 1 <= len(outage_logs) <= 1 + int(elapsed), [r.getMessage() for r in outage_logs]
        assert broker.core.heads["room"] == 3  # join, join, before: the refused seqs were given back
        # space returns: the same lines resent are stored once, in order, and seen once
        cap_pages(broker, 100_000)
        for i in range(1, 4):
            reply = await peer.ask(p.Send(sid="writer-1", cid=f"c{i}", text=f"after {i}", room="room"))
            assert isinstance(reply, p.Ack) and reply.stored[0].seq == 3 + i, reply
        got = await chat(reader, 3)
        assert [(m.seq, m.text) for m in got] == [(4, "after 1"), (5, "after 2"), (6, "after 3")]
        assert any("storage writable again" in r.getMessage() for r in caplog.records)
    finally:
        peer.close()


async def test_the_client_keeps_refused_sends_pending_and_delivers_them_once_space_returns(connect, broker) -> None:
    """fails with the old client (its broker answered internal, which it resent): a
    storage_unavailable refusal ended the send with a ClientError, and nothing was resent."""
    reader = await connect("reader")
    await reader.join("room")
    writer = await connect("writer", ack_timeout=0.3)
    await writer.join("room")
    cap_pages(broker, 0)
    sends = [asyncio.create_task(writer.send("room", f"{i} {BIG}", timeout=30)) for i in range(5)]
    await wait_for(lambda: broker.core.counters.get("undone_batches", 0) >= 3, timeout=10, what="refusals")
    assert not any(t.done() for t in sends)  # still pending, none failed
    cap_pages(broker, 100_000)
    stored = await asyncio.gather(*sends)
    assert sorted(s.seq for s in stored) == list(range(3, 8))
    got = await chat(reader, 5)
    assert sorted(int(m.text.split()[0]) for m in got) == list(range(5))
    assert len({m.seq for m in got}) == 5


async def test_an_unwritable_database_is_storage_unavailable_too(broker) -> None:
    """A database SQLite will not write (here: a read-only connection swapped in)."""
    peer = RawPeer(broker, "writer", "writer-1")
    storage = broker.broker.storage
    try:
        assert isinstance(await peer.ask(p.Hello(rid=1)), p.Welcome)
        assert isinstance(await peer.ask(p.Join(rid=2, room="room")), p.Joined)
        storage._db.execute("PRAGMA query_only=1")
        reply = await peer.ask(p.Send(sid="writer-1", cid="ro", text="refused", room="room"))
        assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.STORAGE_UNAVAILABLE, reply
        storage._db.execute("PRAGMA query_only=0")
        reply = await peer.ask(p.Send(sid="writer-1", cid="ro", text="stored", room="room"))
        assert isinstance(reply, p.Ack), reply
    finally:
        storage._db.execute("PRAGMA query_only=0")
        peer.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of our own (needs the right to mount: root, as in CI); skipped otherwise."""
    where = tmp_path / "small-fs"
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


async def test_a_really_full_filesystem_refuses_then_recovers_when_space_is_freed(small_fs: Path, caplog) -> None:
    """ENOSPC from the kernel, not a pragma: a filler file leaves ~600 KB, 20 KB lines fill
    it; deleting the filler is the operator freeing space."""
    caplog.set_level(logging.INFO, logger="zchat.broker")
    running = await RunningBroker(small_fs / "history.db", Limits(heartbeat=5.0, rate=0)).start()
    peer = RawPeer(running, "writer", "writer-1")
    filler = small_fs / "filler"
    try:
        st = os.statvfs(small_fs)
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 600_000))
        assert isinstance(await peer.ask(p.Hello(rid=1)), p.Welcome)
        assert isinstance(await peer.ask(p.Join(rid=2, room="room")), p.Joined)
        acked, codes = [], set()
        for i in range(100):
            reply = await peer.ask(p.Send(sid="writer-1", cid=f"c{i}", text="x" * 20_000, room="room"))
            if isinstance(reply, p.Ack):
                assert not codes, "an ack after a refusal while the disk stayed full"
                acked.append(reply.stored[0].seq)
            else:
                assert isinstance(reply, p.Error), reply
                codes.add(reply.code)
        assert acked and codes == {p.ErrorCode.STORAGE_UNAVAILABLE}
        history = await peer.ask(p.History(rid=3, room="room", limit=1000))
        assert isinstance(history, p.HistoryReply)
        assert [m.seq for m in history.messages if m.kind == "text"] == acked  # every ack is stored
        filler.unlink()
        reply = await peer.ask(p.Send(sid="writer-1", cid="after", text="space again", room="room"))
        assert isinstance(reply, p.Ack) and reply.stored[0].seq == acked[-1] + 1, reply
        assert any("storage writable again" in r.getMessage() for r in caplog.records)
    finally:
        peer.close()
        await running.stop()
