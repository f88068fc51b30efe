"""Edits in the shared storage suite: the line takes the new text and is marked edited;
a late or repeated edit changes nothing; search follows the text (SQLite)."""


from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.integration.test_storage import Backend, backend, msg, storage
from zchat.storage import Storage
from zchat.storage.redis import RedisStorage
from zchat.storage.sqlite import SqliteStorage


async def test_edit_replaces_the_text_of_a_text_line_only(storage: Storage) -> None:
    await storage.append([msg("dev", 1, "tpyo", cid="c1"), msg("dev", 2, "waves", kind="me"), msg("dev", 3, "", kind="join")])
    await storage.append([msg("dev", 4, "typo", kind="edit", ref=1), msg("dev", 5, "waves back", kind="edit", ref=2)])
    assert await storage.edit("dev", 1, "typo", 4)
    assert await storage.edit("dev", 2, "waves back", 5)
    assert not await storage.edit("dev", 3, "x", 6)  # a join line
    assert not await storage.edit("dev", 9, "x", 6) and not await storage.edit("nope", 1, "x", 6)
    assert not await storage.edit("dev", 1, "older", 4)  # the same edit again, or an older one: no change
    got = await storage.range("dev", after=0, limit=10)
    assert [(m.seq, m.kind, m.text, m.edited, m.ref) for m in got] == [
        (1, "text", "typo", 4, 0), (2, "me", "waves back", 5, 0), (3, "join", "m3", 0, 0),
        (4, "edit", "typo", 0, 1), (5, "edit", "waves back", 0, 2),
    ]
    assert (got[0].id, got[0].sender, got[0].cid, got[0].ts) == ("dev-1", "alice", "c1", 1_700_000_001.0)
    assert await storage.tombstone("dev", 1)
    assert not await storage.edit("dev", 1, "too late", 7)  # deleted stays deleted
    if not isinstance(storage, RedisStorage):
        assert [m.seq for m in await storage.search("typo", 10)] == []  # the tombstone took it out
        assert [m.text for m in await storage.search("back", 10)] == ["waves back"]


async def test_search_finds_the_new_text_not_the_old(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "h.db")
    await store.open()
    await store.append([msg("dev", 1, "meet at noon")])
    await store.append([msg("dev", 2, "meet at ten", kind="edit", ref=1)])
    assert await store.edit("dev", 1, "meet at ten", 2)
    assert await store.search("noon", 10) == []
    assert [(m.seq, m.edited) for m in await store.search("ten", 10)] == [(1, 2)]  # the line, not its edit line
    await store.close()


async def test_a_file_from_before_edits_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE messages (room TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, ts REAL NOT NULL,
            sender TEXT NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL, to_name TEXT NOT NULL, cid TEXT NOT NULL,
            PRIMARY KEY (room, seq)) WITHOUT ROWID;
        INSERT INTO messages VALUES ('dev', 1, 'x-1', 1.0, 'alice', 'text', 'old words', '', '');
    """)
    db.close()
    store = SqliteStorage(path)
    await store.open()
    assert [(m.text, m.edited) for m in await store.range("dev", 0, 10)] == [("old words", 0)]
    assert [m.seq for m in await store.search("old", 10)] == [1]  # and its search index
    await store.append([msg("dev", 2, "new words", kind="edit", ref=1)])
    assert await store.edit("dev", 1, "new words", 2)
    await store.close()
    store = SqliteStorage(path)
    await store.open()
    assert [(m.text, m.edited) for m in await store.range("dev", 0, 1)] == [("new words", 2)]
    await store.close()
