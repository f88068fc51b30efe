"""Search in the shared storage suite: SQLite answers from FTS5 in an index file of its
own, kept by a thread of its own (a search waits until it has every stored line);
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
from tests.conftest import wait_for
from zchat.storage import SearchUnsupported, Storage, StorageError, StorageUnavailable, sqlite_search
from zchat.storage.redis import RedisStorage
from zchat.storage.sqlite import SqliteStorage
from zchat.storage.sqlite_search import index_path


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


async def test_a_failed_append_indexes_nothing(storage: Storage) -> None:
    await searchable(storage)
    await storage.append([msg("dev", 1, "first")])
    with pytest.raises(StorageError):
        await storage.append([msg("dev", 2, "orphan words"), msg("dev", 1, "dup")])
    assert await storage.search("orphan", 10) == []
    await storage.append([msg("dev", 2, "orphan words")])
    assert [m.seq for m in await storage.search("orphan", 10)] == [2]


def _indexed(history: Path, word: str = "") -> int:
    """Lines in the FTS5 index file (those with ``word``), read by a connection of its
    own: what the index thread committed."""
    db = sqlite3.connect(index_path(history))
    try:
        if word:
            return db.execute("SELECT COUNT(*) FROM search_text WHERE search_text MATCH ?", (word,)).fetchone()[0]
        return db.execute("SELECT COUNT(*) FROM search_text").fetchone()[0]
    finally:
        db.close()


async def until_indexed(history: Path, count: int, word: str = "") -> None:
    await wait_for(lambda: _indexed(history, word) == count, what=f"{count} lines in the index file")


async def indexed_history(path: Path, lines: list) -> None:  # type: ignore[type-arg]
    """A history at ``path`` holding ``lines`` (text lines), every one in its index file, closed."""
    store = SqliteStorage(path)
    await store.open()
    await store.append(lines)
    await until_indexed(path, len(lines))
    await store.close()


async def test_the_append_stores_the_line_and_the_thread_indexes_it(tmp_path: Path) -> None:
    """fails on the old storage (the words went into the history file, in the broker's
    thread): the history file holds no index, the index file gets every text and /me
    line, and a search right after an append finds its line."""
    path = tmp_path / "history.db"
    store = SqliteStorage(path)
    await store.open()
    await store.append([msg("dev", 1, "hello there"), msg("dev", 2, "", kind="join"), msg("ops", 1, "waves", kind="me")])
    await store.append([msg("dev", 3, "fresh words")])
    assert [m.seq for m in await store.search("fresh", 10)] == [3]  # found right after its append
    await until_indexed(path, 3)
    db = sqlite3.connect(path)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert not {"search_text", "search_rows"} & tables
    await store.close()


async def test_changed_lines_leave_the_index_file_too(tmp_path: Path) -> None:
    """A tombstone, an edit, retention, of lines indexed or not yet: searches find the
    lines as they are, and the words taken away are gone from the index file (not only
    skipped by the search's join)."""
    path = tmp_path / "history.db"
    store = SqliteStorage(path)
    await store.open()
    await store.append([msg("dev", n, f"before {n}") for n in range(1, 4)])
    await until_indexed(path, 3)
    await store.append([msg("dev", 4, "before 4")])
    await store.append([msg("dev", 5, "before 5")])
    assert await store.tombstone("dev", 5)
    assert await store.edit("dev", 4, "after edit", by=1)
    assert await store.tombstone("dev", 3)
    assert await store.prune("dev", keep=3) == 2  # seqs 1 and 2
    assert await store.search("before", 10) == []
    assert [(m.seq, m.text) for m in await store.search("after", 10)] == [(4, "after edit")]
    await until_indexed(path, 1)
    assert _indexed(path, "before") == 0 and _indexed(path, "after") == 1
    await store.close()


async def test_a_file_of_the_old_layout_is_indexed_at_open(tmp_path: Path) -> None:
    """A file from before the index file (its words in search_rows/search_text), or
    from before search: its old tables go, and every line is found."""
    path = tmp_path / "history.db"
    store = SqliteStorage(path)
    await store.open()
    await store.append([msg("dev", 1, "before search existed"), msg("dev", 2, "more words")])
    await store.close()
    index_path(path).unlink()
    db = sqlite3.connect(path)  # what the old layout kept in the history file
    db.executescript(
        "CREATE TABLE search_rows (id INTEGER PRIMARY KEY, room TEXT NOT NULL, seq INTEGER NOT NULL);"
        "CREATE VIRTUAL TABLE search_text USING fts5(text); INSERT INTO meta VALUES ('search', '1');"
    )
    db.close()
    for _ in range(2):  # idempotent
        store = SqliteStorage(path)
        await store.open()
        assert [m.seq for m in await store.search("search", 10)] == [1]
        assert [m.seq for m in await store.search("words", 10)] == [2]
        await store.close()
    db = sqlite3.connect(path)
    assert not db.execute("SELECT name FROM sqlite_master WHERE name IN ('search_rows', 'search_text')").fetchall()
    db.close()


async def test_what_an_older_broker_did_to_the_file(tmp_path: Path) -> None:
    """A broker from before search, run on the file: what it deleted is never found;
    what it stored is found (past the index's cursor)."""
    path = tmp_path / "history.db"
    await indexed_history(path, [msg("dev", 1, "indexed words"), msg("dev", 2, "doomed words"), msg("dev", 3, "pruned words")])
    db = sqlite3.connect(path)  # what a broker from before search does to the file
    db.execute("INSERT INTO messages (room, seq, id, ts, sender, kind, text, to_name, cid) "
               "VALUES ('dev', 4, 'x', 1700000004.0, 'bob', 'text', 'unindexed words', '', '')")
    db.execute("UPDATE messages SET kind = 'deleted', text = '' WHERE seq = 2")
    db.execute("DELETE FROM messages WHERE seq = 3")
    db.commit()
    db.close()
    store = SqliteStorage(path)
    await store.open()
    assert [m.seq for m in await store.search("words", 10)] == [4, 1]
    await store.close()


async def test_an_index_that_does_not_match_the_history_is_rebuilt(tmp_path: Path) -> None:
    """fails without the check at open: an older copy of the history put back (a
    restore) leaves the index ahead of it, so the new lines at those seqs would never be
    indexed and the old words would find them. A new epoch rebuilds it too."""
    path = tmp_path / "history.db"
    store = SqliteStorage(path)
    await store.open()
    await store.append([msg("dev", 1, "kept words"), msg("dev", 2, "kept words")])
    await store.close()
    copy = path.read_bytes()  # closed: no WAL
    store = SqliteStorage(path)
    await store.open()
    await store.append([msg("dev", 3, "lost words"), msg("dev", 4, "lost words")])
    await until_indexed(path, 4)
    await store.close()
    path.write_bytes(copy)  # the restore
    store = SqliteStorage(path)
    await store.open()
    await store.append([msg("dev", 3, "new words"), msg("dev", 4, "new words")])
    assert await store.search("lost", 10) == []
    assert [m.seq for m in await store.search("new", 10)] == [4, 3]
    await store.close()
    db = sqlite3.connect(index_path(path))
    db.execute("UPDATE meta SET value = 'another' WHERE key = 'epoch'")
    db.execute("DELETE FROM search_text")
    db.commit()
    db.close()
    store = SqliteStorage(path)
    await store.open()
    assert [m.seq for m in await store.search("words", 10)] == [4, 3, 2, 1]
    await store.close()


async def test_lines_a_killed_broker_had_not_indexed_are_found_after_it(tmp_path: Path) -> None:
    """A broker killed before its index thread reached its last lines: the next open's
    thread finds them past the cursors."""
    path = tmp_path / "history.db"
    script = (
        "import asyncio, os, sys\n"
        "from zchat.protocol import Msg\n"
        "from zchat.storage import sqlite_search\n"
        "from zchat.storage.sqlite import SqliteStorage\n"
        "sqlite_search.PASS_DELAY = 3600  # the thread's first pass, then nothing before the kill\n"
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
    assert [m.seq for m in await store.search("orphan", 10)] == [3, 2, 1]
    await store.close()


async def test_the_index_stays_whole_whoever_wrote_the_file_last(tmp_path: Path) -> None:
    """Two storages on one file (a tool beside the broker): each indexes what is past the
    index's cursors, never what the other already indexed."""
    path = tmp_path / "history.db"
    first = SqliteStorage(path)
    await first.open()
    await first.append([msg("dev", 1, "shared words one")])
    second = SqliteStorage(path)
    await second.open()
    await second.append([msg("dev", 2, "shared words two")])
    assert [m.seq for m in await second.search("shared", 10)] == [2, 1]
    await second.close()
    await first.append([msg("dev", 3, "shared words three")])
    assert [m.seq for m in await first.search("shared", 10)] == [3, 2, 1]
    assert _indexed(path) == 3
    await first.close()


async def test_a_search_waits_for_the_index_a_bounded_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index thread that cannot keep up (here: stopped) costs a search WAIT_FOR_INDEX
    and a clear error, never a wrong answer or a broker that waits for ever."""
    monkeypatch.setattr(sqlite_search, "WAIT_FOR_INDEX", 0.3)
    store = SqliteStorage(tmp_path / "history.db")
    await store.open()
    await store.append([msg("dev", 1, "early words")])
    assert [m.seq for m in await store.search("early", 10)] == [1]
    index = store._search
    assert index is not None and index._thread is not None
    index._stopping = True
    index._wake.set()
    index._hurry.set()
    index._thread.join(5)
    await store.append([msg("dev", 2, "late words")])
    with pytest.raises(StorageUnavailable, match="behind"):
        await store.search("words", 10)
    await store.close()


async def test_a_backlog_is_indexed_a_bounded_pass_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild, or a flood across many rooms, is indexed PASS_LINES lines a transaction;
    a search still waits for all of it, and finds it."""
    monkeypatch.setattr(sqlite_search, "PASS_LINES", 7)
    store = SqliteStorage(tmp_path / "history.db")
    await store.open()
    await store.append([msg(f"r{r}", n, f"many {r} {n}") for r in range(4) for n in range(1, 11)])
    assert len(await store.search("many", 100)) == 40
    await store.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
async def test_the_index_thread_gives_way_to_the_broker(tmp_path: Path) -> None:
    """fails with the thread at the broker's priority: on a busy machine, storing and
    delivering come first and indexing catches up after."""
    store = SqliteStorage(tmp_path / "h.db")
    await store.open()
    try:
        await store.append([msg("dev", 1, "a word")])
        assert found(await store.search("word", 10)) == [("dev", 1)]  # the thread runs
        index = store._search
        assert index is not None and index.native_id

        def nice(stat: str) -> int:
            return int(Path(stat).read_text().rsplit(")", 1)[1].split()[16])

        mine = nice("/proc/thread-self/stat")  # the broker's own thread keeps its priority
        assert nice(f"/proc/self/task/{index.native_id}/stat") == max(mine, sqlite_search.INDEX_NICE) > mine
    finally:
        await store.close()


async def test_changes_made_with_search_off_are_not_found_by_their_old_words(tmp_path: Path) -> None:
    """fails on the index a later run trusted: a run with search off applied an edit and
    a tombstone that no index thread heard of, so the old words stayed in the index file
    and the edited line was found by them. That run marks the history; the next run with
    search makes its index again (and clears the mark)."""
    path = tmp_path / "history.db"
    await indexed_history(path, [msg("dev", 1, "oldword one"), msg("dev", 2, "oldword two"), msg("dev", 3, "kept words")])
    store = SqliteStorage(path, search=False)
    await store.open()
    assert await store.edit("dev", 1, "newword one", by=4)
    assert await store.tombstone("dev", 2)
    await store.close()
    for _ in range(2):  # the second run trusts the index made by the first
        store = SqliteStorage(path)
        await store.open()
        assert await store.search("oldword", 10) == []
        assert [(m.seq, m.text) for m in await store.search("newword", 10)] == [(1, "newword one")]
        assert found(await store.search("kept", 10)) == [("dev", 3)]
        await until_indexed(path, 2)
        assert _indexed(path, "oldword") == 0
        await store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT 1 FROM meta WHERE key = 'search_stale'").fetchone() is None
    db.close()
