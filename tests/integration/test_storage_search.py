"""Search in the shared storage suite: SQLite answers from FTS5 kept with every write
(indexed a batch at a time, and before every search);
Redis says clearly that it cannot (SearchUnsupported, which the broker turns into
``not_supported``)."""

# ruff: noqa: F811  (the shared suite's fixtures, imported, are the tests' arguments)
from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import pytest

from tests.integration.test_storage import Backend, backend, msg, storage  # noqa: F401  (fixtures)
from zchat.storage import SearchUnsupported, Storage, StorageError
from zchat.storage.redis import RedisStorage
from zchat.storage.sqlite import SqliteStorage


def found(page: list) -> list[tuple[str, int]]:  # type: ignore[type-arg]
    return [(m.room, m.seq) for m in page]


async def searchable(storage: Storage) -> None:
    if isinstance(storage, RedisStorage):
        with pytest.raises(SearchUnsupported):
            await storage.search("anything", 10)
        pytest.skip("Redis answers every search with SearchUnsupported (checked above)")


async def test_search_finds_every_word_newest_first_in_readable_rooms(storage: Storage) -> None:
    await searchable(storage)
    await storage.append([
        msg("dev", 1, "the deploy failed"), msg("ops", 1, "Deploy done, all green"), msg("dev", 2, "lunch?"),
        msg("dev", 3, "", kind="join"), msg("secret", 1, "deploy the secret thing"), msg("dev", 4, "café au lait", kind="me"),
    ])
    assert found(await storage.search("deploy", 10)) == [("secret", 1), ("ops", 1), ("dev", 1)]
    assert found(await storage.search("DEPLOY green", 10)) == [("ops", 1)]  # every word, any case
    assert found(await storage.search("deploy", 10, readable=lambda room: room != "secret")) == [("ops", 1), ("dev", 1)]
    assert found(await storage.search("deploy", 10, room="dev")) == [("dev", 1)]
    assert found(await storage.search("cafe", 10)) == [("dev", 4)]  # diacritics folded; /me lines too
    assert found(await storage.search("dep*", 10)) == [("secret", 1), ("ops", 1), ("dev", 1)]
    assert found(await storage.search("m3", 10)) == []  # a join line is not searched
    hit = (await storage.search("lunch", 1))[0]
    assert (hit.sender, hit.ts, hit.text, hit.kind) == ("alice", 1_700_000_002.0, "lunch?", "text")
    for hostile in ('"', 'deploy" OR "lunch', "NEAR(", "*", "a:b", ")("):
        assert isinstance(await storage.search(hostile, 10), list)  # no FTS syntax gets through


async def test_search_pages_with_next(storage: Storage) -> None:
    await searchable(storage)
    await storage.append([msg("dev", n, f"word {n}") for n in range(1, 8)])
    first = await storage.search("word", 3)
    assert [m.seq for m in first] == [7, 6, 5] and first.next > 0
    second = await storage.search("word", 3, before=first.next)
    assert [m.seq for m in second] == [4, 3, 2]
    third = await storage.search("word", 3, before=second.next)
    assert [m.seq for m in third] == [1]
    assert third.next == 0
    cut = await storage.search("word", 10, max_bytes=300)  # two lines fit in 300 bytes by msg_bytes
    assert [m.seq for m in cut] == [7, 6] and cut.next > 0
    assert [m.seq for m in await storage.search("word", 10, before=cut.next)] == [5, 4, 3, 2, 1]


async def test_tombstones_and_retention_leave_the_index(storage: Storage) -> None:
    await searchable(storage)
    await storage.append([msg("dev", n, f"needle {n}") for n in range(1, 6)])
    assert await storage.tombstone("dev", 5)
    assert [m.seq for m in await storage.search("needle", 10)] == [4, 3, 2, 1]
    assert await storage.prune("dev", keep=2) == 3  # seqs 1..3 go; 4 and the tombstone 5 stay
    assert [m.seq for m in await storage.search("needle", 10)] == [4]


async def test_an_older_file_gets_its_index_once_at_open(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    store = SqliteStorage(path)
    await store.open()
    await store.append([msg("dev", 1, "before search existed"), msg("dev", 2, "more words")])
    await store.close()
    db = sqlite3.connect(path)  # what a file from before search looks like
    db.executescript("DROP TABLE search_text; DROP TABLE search_rows; DELETE FROM meta WHERE key = 'search';")
    db.close()
    for _ in range(2):  # idempotent: the second open builds nothing twice
        store = SqliteStorage(path)
        await store.open()
        assert [m.seq for m in await store.search("search", 10)] == [1]
        assert [m.seq for m in await store.search("words", 10)] == [2]
        await store.append([msg("dev", 3, "search again")])
        assert [m.seq for m in await store.search("search", 10)][0] == 3
        await store.close()
        db = sqlite3.connect(path)
        db.execute("DELETE FROM messages WHERE seq = 3")
        db.execute("DELETE FROM search_text WHERE rowid IN (SELECT id FROM search_rows WHERE seq = 3)")
        db.execute("DELETE FROM search_rows WHERE seq = 3")
        db.commit()
        db.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM search_rows").fetchone()[0] == 2
    db.close()


async def test_a_failed_append_indexes_nothing(storage: Storage) -> None:
    await searchable(storage)
    await storage.append([msg("dev", 1, "first")])
    with pytest.raises(StorageError):
        await storage.append([msg("dev", 2, "orphan words"), msg("dev", 1, "dup")])
    assert await storage.search("orphan", 10) == []
    await storage.append([msg("dev", 2, "orphan words")])
    assert [m.seq for m in await storage.search("orphan", 10)] == [2]


async def test_what_an_older_broker_did_to_the_file(tmp_path: Path) -> None:
    """A broker from before search, run on the file: what it deleted is never found; what
    it stored is found once the index is built again (meta 'search' deleted)."""
    path = tmp_path / "history.db"
    store = SqliteStorage(path)
    await store.open()
    await store.append([msg("dev", 1, "indexed words"), msg("dev", 2, "doomed words"), msg("dev", 3, "pruned words")])
    await store.close()
    db = sqlite3.connect(path)  # what a broker from before search does to the file
    db.execute("INSERT INTO messages (room, seq, id, ts, sender, kind, text, to_name, cid) "
               "VALUES ('dev', 4, 'x', 1700000004.0, 'bob', 'text', 'unindexed words', '', '')")
    db.execute("UPDATE messages SET kind = 'deleted', text = '' WHERE seq = 2")
    db.execute("DELETE FROM messages WHERE seq = 3")
    db.commit()
    db.close()
    store = SqliteStorage(path)
    await store.open()
    assert [m.seq for m in await store.search("words", 10)] == [1]
    await store.close()
    db = sqlite3.connect(path)
    db.execute("DELETE FROM meta WHERE key = 'search'")  # docs/operations.md, Upgrading
    db.commit()
    db.close()
    store = SqliteStorage(path)
    await store.open()
    assert [m.seq for m in await store.search("words", 10)] == [4, 1]
    await store.close()


def _indexed(path: Path) -> int:
    """Lines in the FTS5 index, read by a connection of its own (what is committed)."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM search_text").fetchone()[0]
    finally:
        db.close()


async def test_lines_a_transaction_each_are_indexed_a_batch_at_a_time_and_found_at_once(tmp_path: Path) -> None:
    """The broker's quiet path stores a line a transaction; each FTS5 commit writes a
    segment, so the index is filled INDEX_BATCH lines at a time, yet a search right
    after an append finds its line."""
    path = tmp_path / "history.db"
    store = SqliteStorage(path)
    await store.open()
    batch = store.index_batch
    assert batch > 1
    for seq in range(1, batch):
        await store.append([msg("dev", seq, f"needle {seq}")])
    assert _indexed(path) == 0  # not one FTS5 commit yet
    await store.append([msg("dev", batch, f"needle {batch}")])
    assert _indexed(path) == batch  # the append that filled the batch indexed it
    await store.append([msg("dev", batch + 1, "haystack fresh")])
    assert _indexed(path) == batch
    assert [m.seq for m in await store.search("fresh", 10)] == [batch + 1]  # found right after its append
    assert [m.seq for m in await store.search("needle", 3)] == [batch, batch - 1, batch - 2]
    await store.close()


async def test_big_lines_are_indexed_before_a_batch_of_them_grows_large(tmp_path: Path) -> None:
    """The batch is bounded in bytes too: 64 lines of 30 KB held for one append would
    make that append (and the broker's turn) index 2 MB of words at once."""
    from zchat.storage.sqlite import INDEX_BATCH_BYTES

    path = tmp_path / "history.db"
    store = SqliteStorage(path)
    await store.open()
    big = 30 * 1024
    per_batch = -(-INDEX_BATCH_BYTES // big)  # lines whose text reaches the byte bound
    assert per_batch < store.index_batch
    for seq in range(1, per_batch):
        await store.append([msg("dev", seq, "word " * (big // 5))])
    assert _indexed(path) == 0
    await store.append([msg("dev", per_batch, "word " * (big // 5))])
    assert _indexed(path) == per_batch  # indexed at the byte bound, not at the 64th line
    await store.close()


async def test_lines_not_yet_indexed_are_changed_like_the_others(tmp_path: Path) -> None:
    """A tombstone, an edit or retention of a line stored since the last batch: the batch
    indexes the line as it is by then (or not at all)."""
    store = SqliteStorage(tmp_path / "history.db")
    await store.open()
    await store.append([msg("dev", n, f"before {n}") for n in range(1, 4)])
    await store.append([msg("dev", 4, "before 4")])  # one line a transaction: not indexed yet
    await store.append([msg("dev", 5, "before 5")])
    assert await store.tombstone("dev", 5)
    assert await store.edit("dev", 4, "after edit", by=1)
    assert await store.prune("dev", keep=3) == 2  # seqs 1 and 2
    assert [m.seq for m in await store.search("before", 10)] == [3]
    assert [(m.seq, m.text) for m in await store.search("after", 10)] == [(4, "after edit")]
    assert await store.search("before 4", 10) == []
    await store.close()


async def test_lines_a_killed_broker_had_not_indexed_are_found_after_it(tmp_path: Path) -> None:
    """A broker killed between two batches: the next open indexes what it stored."""
    path = tmp_path / "history.db"
    script = (
        "import asyncio, os, sys\n"
        "from zchat.protocol import Msg\n"
        "from zchat.storage.sqlite import SqliteStorage\n"
        "async def main():\n"
        "    store = SqliteStorage(sys.argv[1])\n"
        "    await store.open()\n"
        "    for seq in (1, 2, 3):\n"
        "        await store.append([Msg(room='dev', seq=seq, id=str(seq), ts=1.0 * seq, sender='bob', text=f'orphan {seq}')])\n"
        "    os._exit(0)  # no close: as a kill -9 leaves the file\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(path))
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    assert _indexed(path) == 0
    store = SqliteStorage(path)
    await store.open()
    assert _indexed(path) == 3  # indexed in the transaction that opened the file
    assert [m.seq for m in await store.search("orphan", 10)] == [3, 2, 1]
    await store.close()


async def test_the_index_stays_whole_whoever_wrote_the_file_last(tmp_path: Path) -> None:
    """Two storages on one file (a tool beside the broker): each indexes what is past the
    index itself, never what another already indexed."""
    path = tmp_path / "history.db"
    first = SqliteStorage(path)
    await first.open()
    await first.append([msg("dev", 1, "shared words one")])
    second = SqliteStorage(path)
    await second.open()  # indexes what the first had not
    await second.append([msg("dev", 2, "shared words two")])
    await second.close()  # and its own line
    await first.append([msg("dev", 3, "shared words three")])
    assert [m.seq for m in await first.search("shared", 10)] == [3, 2, 1]
    assert _indexed(path) == 3
    await first.close()
