"""One suite for every Storage implementation: SQLite on a temp file, Redis on a real server."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from zchat.protocol import Msg, dm_room
from zchat.storage import Storage, StorageError, open_storage
from zchat.storage.redis import RedisStorage
from zchat.storage.sqlite import SqliteStorage


class Backend:
    """Makes storage objects on one backing store (same file / same prefix) or on a fresh one."""

    def __init__(self, make: Callable[[str], Storage]) -> None:
        self._make = make
        self.location = uuid.uuid4().hex

    def new(self) -> Storage:
        return self._make(self.location)

    def fresh(self) -> Storage:
        return self._make(uuid.uuid4().hex)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend(lambda loc: SqliteStorage(tmp_path / loc / "history.db"))
    url = request.getfixturevalue("redis_url")
    return Backend(lambda loc: RedisStorage(url, prefix=f"zchat-test:{loc}:"))


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    store = backend.new()
    await store.open()
    yield store
    await store.close()


def msg(room: str, seq: int, text: str = "", **kw: object) -> Msg:
    fields: dict = {"id": f"{room}-{seq}", "ts": 1_700_000_000.0 + seq, "sender": "alice", "text": text or f"m{seq}"}
    fields.update(kw)
    return Msg(room=room, seq=seq, **fields)


def seqs(messages: list[Msg]) -> list[int]:
    return [m.seq for m in messages]


# ------------------------------------------------------------------ epoch


async def test_epoch_stable_across_reopen_and_new_for_fresh_store(backend: Backend) -> None:
    first = backend.new()
    epoch = await first.open()
    await first.close()
    again = backend.new()
    assert await again.open() == epoch
    await again.close()
    other = backend.fresh()
    other_epoch = await other.open()
    await other.close()
    assert epoch and other_epoch and other_epoch != epoch


# ---------------------------------------------------------------- history


async def test_append_and_heads(storage: Storage) -> None:
    assert await storage.heads() == {}
    await storage.append([msg("dev", 1), msg("dev", 2), msg("ops", 1)])
    await storage.append([msg("dev", 3)])
    assert await storage.heads() == {"dev": 3, "ops": 1}
    await storage.append([msg("dev", 6), msg("dev", 5)])  # the head is the maximum, not the last written
    await storage.append([msg("dev", 4)])
    assert await storage.heads() == {"dev": 6, "ops": 1}


async def test_append_empty_batch_is_a_no_op(storage: Storage) -> None:
    await storage.append([])
    assert await storage.heads() == {}


async def test_range_bounds_are_exclusive_and_ascending(storage: Storage) -> None:
    await storage.append([msg("dev", s) for s in range(1, 11)])
    assert seqs(await storage.range("dev", after=0, limit=100)) == list(range(1, 11))
    assert seqs(await storage.range("dev", after=3, limit=100)) == list(range(4, 11))
    assert seqs(await storage.range("dev", after=3, limit=100, before=7)) == [4, 5, 6]
    assert seqs(await storage.range("dev", after=3, limit=2)) == [4, 5]
    assert seqs(await storage.range("dev", after=0, limit=100, before=2)) == [1]
    assert await storage.range("dev", after=10, limit=100) == []
    assert await storage.range("dev", after=4, limit=100, before=5) == []
    assert await storage.range("dev", after=0, limit=0) == []
    assert await storage.range("nowhere", after=0, limit=10) == []


async def test_last_with_and_without_before(storage: Storage) -> None:
    assert await storage.last("dev", 5) == []
    await storage.append([msg("dev", s) for s in range(1, 11)])
    assert seqs(await storage.last("dev", 5)) == [6, 7, 8, 9, 10]
    assert seqs(await storage.last("dev", 100)) == list(range(1, 11))
    assert seqs(await storage.last("dev", 3, before=8)) == [5, 6, 7]
    assert seqs(await storage.last("dev", 5, before=4)) == [1, 2, 3]
    assert await storage.last("dev", 5, before=1) == []
    assert await storage.last("dev", 0) == []


async def test_pages_are_cut_by_bytes_but_never_empty(storage: Storage) -> None:
    """12 unread History(limit=1000) pages of 60 KB lines cost the broker +656 MB."""
    big = "x" * 60_000
    await storage.append([msg("dev", s, big) for s in range(1, 41)])
    page = await storage.range("dev", after=0, limit=1000, max_bytes=1024 * 1024)
    assert seqs(page) == list(range(1, 18)) and page.cut  # 17 * 60 KB fit in 1 MiB
    page = await storage.last("dev", 1000, max_bytes=1024 * 1024)
    assert seqs(page) == list(range(24, 41)) and page.cut  # the newest that fit
    whole = await storage.range("dev", after=0, limit=10, max_bytes=1024 * 1024)
    assert seqs(whole) == list(range(1, 11)) and not whole.cut
    one = await storage.last("dev", 5, max_bytes=10)  # a budget below one message still gives one
    assert seqs(one) == [40] and one.cut
    assert not (await storage.range("dev", after=40, limit=10, max_bytes=10)).cut


async def test_append_stores_membership_with_the_batch_or_not_at_all(storage: Storage) -> None:
    """A join line and its membership are stored together (a failing set_member used to
    abort the turn after its lines were stored)."""
    await storage.append([msg("dev", 1, kind="join")], [("dev", "alice", True)])
    assert await storage.members() == {"dev": {"alice"}}
    with pytest.raises(StorageError):  # seq 1 is taken: neither the lines nor the changes are stored
        await storage.append([msg("dev", 2, kind="join", sender="bob"), msg("dev", 1)], [("dev", "bob", True), ("dev", "alice", False)])
    assert await storage.members() == {"dev": {"alice"}}
    assert await storage.heads() == {"dev": 1}
    await storage.append([msg("dev", 2, kind="part")], [("dev", "alice", False)])
    await storage.append([], [("ops", "carol", True)])  # changes alone (a DM conversation's first line comes with its own)
    assert await storage.members() == {"ops": {"carol"}}


async def test_first_seq(storage: Storage) -> None:
    assert await storage.first_seq("dev") == 0
    await storage.append([msg("dev", 7), msg("dev", 5), msg("dev", 9)])
    assert await storage.first_seq("dev") == 5
    assert await storage.first_seq("ops") == 0


async def test_duplicate_seq_raises_and_stores_nothing_of_the_batch(storage: Storage) -> None:
    await storage.append([msg("dev", 1, cid="c1")])
    batch = [msg("ops", 1, cid="c2"), msg("dev", 2, cid="c3"), msg("dev", 1, text="again", cid="c4")]
    with pytest.raises(StorageError):
        await storage.append(batch)
    assert await storage.heads() == {"dev": 1}
    assert [m.text for m in await storage.range("dev", after=0, limit=10)] == ["m1"]
    assert await storage.range("ops", after=0, limit=10) == []
    assert [m.cid for m in await storage.recent(10)] == ["c1"]


async def test_duplicate_within_one_batch_raises_and_stores_nothing(storage: Storage) -> None:
    with pytest.raises(StorageError):
        await storage.append([msg("dev", 1), msg("dev", 2), msg("dev", 1, text="twin")])
    assert await storage.heads() == {}
    assert await storage.range("dev", after=0, limit=10) == []


async def test_rooms_sharing_a_prefix_stay_apart(storage: Storage) -> None:
    await storage.append([msg("dev", 1, "in dev"), msg("devops", 1, "in devops"), msg("devops", 2, "also devops")])
    assert [m.text for m in await storage.last("dev", 10)] == ["in dev"]
    assert [m.text for m in await storage.range("devops", after=0, limit=10)] == ["in devops", "also devops"]
    assert await storage.first_seq("de") == 0
    assert await storage.heads() == {"dev": 1, "devops": 2}


async def test_dm_conversation_rooms_work_as_keys(storage: Storage) -> None:
    room = dm_room("bob", "alice")
    assert room == "@alice:bob"
    await storage.append([msg(room, 1, "hi bob", to="bob"), msg(room, 2, "hi alice", sender="bob", to="alice")])
    assert [(m.sender, m.to) for m in await storage.last(room, 10)] == [("alice", "bob"), ("bob", "alice")]
    assert await storage.heads() == {room: 2}
    assert await storage.first_seq(room) == 1
    await storage.set_member(room, "alice", True)
    assert await storage.members() == {room: {"alice"}}


async def test_all_msg_fields_round_trip(storage: Storage) -> None:
    original = Msg(
        room="dev", seq=42, id="01HZX3", ts=1_712_345_678.123456, sender="zoë",
        text="grüße, 世界 👋🏽 — \"quotes\" and\nnewlines\x00nul", kind="me", to="bob", cid="c-42",
    )
    big = msg("dev", 43, "ä" * 40_000)  # encodes to ~80 KB: larger than one wire body
    await storage.append([original, big])
    assert await storage.range("dev", after=0, limit=10) == [original, big]
    assert await storage.last("dev", 1, before=43) == [original]
    assert await storage.recent(10) == [original]


async def test_msg_epoch_is_not_stored(storage: Storage) -> None:
    """The epoch belongs to the store, not to a message: both backends return it empty."""
    await storage.append([msg("dev", 1, epoch="old-epoch")])
    [stored] = await storage.range("dev", after=0, limit=1)
    assert stored.epoch == ""
    assert stored == msg("dev", 1)


async def test_recent_is_newest_with_cid_oldest_first(storage: Storage) -> None:
    await storage.append([msg("dev", 1, cid="a"), msg("dev", 2), msg("ops", 1, ts=1_700_000_002.5, cid="b")])
    await storage.append([msg("dev", 3, cid="c"), msg("@alice:bob", 1, ts=1_700_000_004.0, cid="d")])
    assert [m.cid for m in await storage.recent(10)] == ["a", "b", "c", "d"]
    assert [m.cid for m in await storage.recent(2)] == ["c", "d"]
    assert [(m.room, m.seq) for m in await storage.recent(2)] == [("dev", 3), ("@alice:bob", 1)]
    assert await storage.recent(0) == []


# ------------------------------------------------------- users and members


async def test_add_user_first_owner_wins(storage: Storage) -> None:
    assert await storage.get_user("alice") is None
    assert await storage.add_user("alice", b"\x00first\xff") is True
    assert await storage.add_user("alice", b"second") is False
    assert await storage.get_user("alice") == b"\x00first\xff"
    assert await storage.add_user("bob", b"bob") is True
    assert await storage.get_user("bob") == b"bob"
    assert await storage.users() == {"alice", "bob"}


async def test_release_user_frees_the_name_only_for_its_digest(storage: Storage) -> None:
    assert await storage.add_user("alice", b"mine") is True
    assert await storage.add_user("bob", b"bobs") is True
    assert await storage.release_user("alice", b"not-mine") is False
    assert await storage.get_user("alice") == b"mine"
    assert await storage.release_user("alice", b"mine") is True
    assert await storage.get_user("alice") is None
    assert await storage.users() == {"bob"}
    assert await storage.release_user("alice") is False  # already free
    assert await storage.add_user("alice", b"new owner") is True  # claimable again
    assert await storage.release_user("bob") is True
    assert await storage.users() == {"alice"}


async def test_members_add_remove_list(storage: Storage) -> None:
    assert await storage.members() == {}
    await storage.set_member("dev", "alice", True)
    await storage.set_member("dev", "bob", True)
    await storage.set_member("dev", "bob", True)
    await storage.set_member("devops", "carol", True)
    assert await storage.members() == {"dev": {"alice", "bob"}, "devops": {"carol"}}
    await storage.set_member("dev", "alice", False)
    await storage.set_member("dev", "nobody", False)
    await storage.set_member("devops", "carol", False)
    assert await storage.members() == {"dev": {"bob"}}


# ------------------------------------------------- invites and revocations


async def test_an_invite_is_taken_once_and_expires(storage: Storage) -> None:
    now = 1_000_000.0
    assert await storage.add_invite("code-a", now + 60, now, limit=10) is True
    assert await storage.add_invite("code-b", now + 1, now, limit=10) is True
    assert await storage.invites(now) == 2
    assert await storage.use_invite("made-up", now) == 0.0
    assert await storage.use_invite("code-a", now) == now + 60
    assert await storage.use_invite("code-a", now) == 0.0  # used
    assert await storage.use_invite("code-b", now + 2) == 0.0  # expired
    assert await storage.invites(now + 2) == 0
    assert await storage.add_invite("code-a", now + 60, now, limit=10) is True  # given back after a failed claim
    assert await storage.use_invite("code-a", now) == now + 60


async def test_invites_are_capped_counting_only_unexpired_codes(storage: Storage) -> None:
    now = 1_000_000.0
    assert await storage.add_invite("old", now + 5, now, limit=2) is True
    assert await storage.add_invite("new", now + 50, now, limit=2) is True
    assert await storage.add_invite("third", now + 50, now, limit=2) is False  # at the cap
    assert await storage.add_invite("third", now + 50, now + 10, limit=2) is True  # "old" expired meanwhile
    assert await storage.invites(now + 10) == 2


async def test_two_claims_racing_for_one_code_one_wins(backend: Backend) -> None:
    first, second = backend.new(), backend.new()
    await first.open()
    await second.open()
    try:
        now = 1_000_000.0
        assert await first.add_invite("shared", now + 60, now, limit=10)
        import asyncio

        won = await asyncio.gather(*[s.use_invite("shared", now) for s in (first, second, first, second)])
        assert sorted(won) == [0.0, 0.0, 0.0, now + 60]
    finally:
        await first.close()
        await second.close()


async def test_revoked_keys_are_kept_bounded_and_can_be_forgotten(storage: Storage) -> None:
    keys = [bytes([i]) * 32 for i in range(5)]
    assert await storage.revoked_keys() == set()
    for i, key in enumerate(keys):
        await storage.set_revoked(key, True, 100.0 + i, limit=3)
    assert await storage.revoked_keys() == set(keys[2:])  # the newest 3
    await storage.set_revoked(keys[3], False, 200.0, limit=3)  # authorised again
    assert await storage.revoked_keys() == {keys[2], keys[4]}


# ------------------------------------------------------------ room settings


async def test_room_settings_change_in_order_and_empty_sets_go(storage: Storage) -> None:
    assert await storage.rooms_state() == {}
    await storage.change_rooms([
        ("sec", "private", "1", True), ("sec", "op", "alice", True), ("sec", "op", "bob", True),
        ("sec", "topic", "old", True), ("sec", "topic", "old", False), ("sec", "topic", "new: 1;2", True),
        ("sec", "ban", "eve", True), ("$", "ban", "mallory", True), ("dev", "invite", "x", True), ("dev", "invite", "x", False),
    ])
    await storage.change_rooms([("sec", "op", "bob", False), ("sec", "op", "nobody", False), ("sec", "op", "alice", True)])
    assert await storage.rooms_state() == {
        "sec": {"private": {"1"}, "op": {"alice"}, "topic": {"new: 1;2"}, "ban": {"eve"}},
        "$": {"ban": {"mallory"}},
    }
    await storage.change_rooms([])


async def test_rooms_sharing_a_prefix_keep_their_settings_apart(storage: Storage) -> None:
    await storage.change_rooms([("dev", "op", "a", True), ("devops", "op", "b", True), ("dev", "ban", "c", True)])
    assert await storage.rooms_state() == {"dev": {"op": {"a"}, "ban": {"c"}}, "devops": {"op": {"b"}}}


async def test_tombstone_replaces_a_text_line_only(storage: Storage) -> None:
    await storage.append([msg("dev", 1, cid="c1"), msg("dev", 2, kind="me"), msg("dev", 3, kind="join", text="")])
    assert await storage.tombstone("dev", 1)
    assert await storage.tombstone("dev", 2)
    assert not await storage.tombstone("dev", 3)  # a join line stays
    assert not await storage.tombstone("dev", 1)  # a tombstone already
    assert not await storage.tombstone("dev", 9) and not await storage.tombstone("nope", 1)
    got = await storage.range("dev", after=0, limit=10)
    assert [(m.seq, m.kind, m.text) for m in got] == [(1, "deleted", ""), (2, "deleted", ""), (3, "join", "m3")]
    assert (got[0].id, got[0].sender, got[0].cid) == ("dev-1", "alice", "c1")  # all else kept
    assert [(m.seq, m.kind, m.text, m.cid) for m in await storage.recent(10)] == [(1, "deleted", "", "c1")]


# ------------------------------------------------------------ persistence


async def test_everything_survives_close_and_reopen(backend: Backend) -> None:
    store = backend.new()
    epoch = await store.open()
    await store.append([msg("dev", 1, cid="x"), msg("dev", 2)])
    await store.add_user("alice", b"digest")
    await store.set_member("dev", "alice", True)
    await store.add_invite("code", 2e9, 1e9, limit=10)
    await store.set_revoked(b"k" * 32, True, 1e9, limit=10)
    await store.change_rooms([("dev", "op", "alice", True)])
    await store.close()

    store = backend.new()
    try:
        assert await store.open() == epoch
        assert await store.range("dev", after=0, limit=10) == [msg("dev", 1, cid="x"), msg("dev", 2)]
        assert await store.heads() == {"dev": 2}
        assert await store.get_user("alice") == b"digest"
        assert await store.members() == {"dev": {"alice"}}
        assert await store.rooms_state() == {"dev": {"op": {"alice"}}}
        assert [m.cid for m in await store.recent(10)] == ["x"]
        assert await store.revoked_keys() == {b"k" * 32}
        assert await store.use_invite("code", 1e9) == 2e9
    finally:
        await store.close()


# ------------------------------------------------------------ sqlite only


@pytest.mark.parametrize(
    "content",
    [b"this is my diary, not a database\n" * 100, b"SQLite format 3\x00" + b"\xde\xad\xbe\xef" * 1024],
    ids=["text", "bad-sqlite-body"],
)
async def test_sqlite_refuses_a_foreign_file_and_leaves_it_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "history.db"
    path.write_bytes(content)
    store = SqliteStorage(path)
    with pytest.raises(StorageError, match="history.db"):
        await store.open()
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.db"]


async def test_sqlite_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "history.db"
    store = SqliteStorage(str(path))
    await store.open()
    await store.close()
    assert path.is_file()


# ------------------------------------------------------------ redis only


async def test_redis_unreachable_raises_storage_error() -> None:
    with socket.socket() as sock:  # bound but never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        store = RedisStorage(f"redis://127.0.0.1:{sock.getsockname()[1]}/0")
        with pytest.raises(StorageError, match="cannot use Redis"):
            await store.open()


# ---------------------------------------------------------------- factory


def test_open_storage_picks_the_backend(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    sqlite = open_storage("sqlite", db)
    assert isinstance(sqlite, SqliteStorage) and sqlite.path == db
    for url in ("redis://localhost:6379/0", "rediss://h:6380", "unix:///tmp/redis.sock"):
        redis = open_storage(url, db)
        assert isinstance(redis, RedisStorage) and redis.url == url
    for bad in ("", "sqlite3", "postgres://x", "redis:/oops"):
        with pytest.raises(ValueError, match="unknown storage"):
            open_storage(bad, db)


async def test_sqlite_new_epoch_after_the_machine_went_down_not_after_a_kill(tmp_path: Path) -> None:
    """A power loss under synchronous=NORMAL can roll back commits while the epoch stays:
    new messages would reuse seqs clients saw. A file left open on another boot gets a new
    epoch; one left open by a killed process on this boot keeps it."""
    import sqlite3

    from zchat.storage import sqlite as sq

    path = tmp_path / "history.db"
    store = SqliteStorage(path)
    epoch = await store.open()
    await store.close()
    assert await SqliteStorage(path).open() == epoch  # clean close, and left open (not closed) below

    def left_running(boot: str) -> None:
        with sqlite3.connect(path) as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('running', ?)", (boot,))

    left_running(sq.boot_id())  # a kill -9 on this boot
    again = SqliteStorage(path)
    assert await again.open() == epoch
    await again.close()
    left_running("another-boot")  # open when the machine went down
    after_crash = SqliteStorage(path)
    new_epoch = await after_crash.open()
    assert new_epoch != epoch
    await after_crash.close()
    assert await SqliteStorage(path).open() == new_epoch  # and it stays


async def test_redis_new_epoch_after_a_lossy_server_restart(redis_url: str) -> None:
    """A Redis without appendfsync always may lose its last writes when it restarts; the
    store then starts a new epoch instead of reusing seqs. The same server keeps it."""
    prefix = f"zchat-test:{uuid.uuid4().hex}:"
    store = RedisStorage(redis_url, prefix=prefix)
    epoch = await store.open()
    await store.close()
    store = RedisStorage(redis_url, prefix=prefix)
    assert await store.open() == epoch  # same server run
    await store._redis.set(prefix + "run", "another-run-id")  # as if the server had restarted
    await store.close()
    store = RedisStorage(redis_url, prefix=prefix)
    assert await store.open() != epoch  # the test server runs without persistence
    await store.close()


# -------------------------------------------------------------- retention


async def prune_all(store: Storage, room: str, **kw: object) -> int:
    """Call prune until it has nothing left to do; the total deleted."""
    total = 0
    for _ in range(1000):
        n = await store.prune(room, **kw)  # type: ignore[arg-type]
        if not n:
            return total
        total += n
    raise AssertionError("prune never finished")


async def test_prune_keeps_the_newest_messages_per_room(storage: Storage) -> None:
    await storage.append([msg("dev", s) for s in range(1, 21)] + [msg("ops", s) for s in range(1, 4)])
    assert await prune_all(storage, "dev", keep=5, batch=4) == 15
    assert seqs(await storage.range("dev", 0, 100)) == [16, 17, 18, 19, 20]
    assert await storage.first_seq("dev") == 16
    assert await prune_all(storage, "ops", keep=5) == 0
    assert seqs(await storage.range("ops", 0, 100)) == [1, 2, 3]
    assert (await storage.heads())["dev"] == 20


async def test_prune_by_age_takes_the_old_prefix_in_batches(storage: Storage) -> None:
    # msg() stamps seq s at 1_700_000_000 + s
    await storage.append([msg("dev", s) for s in range(1, 11)])
    assert await storage.prune("dev", before_ts=1_700_000_000 + 8, batch=3) == 3  # one batch at a time
    assert await prune_all(storage, "dev", before_ts=1_700_000_000 + 8) == 4
    assert seqs(await storage.range("dev", 0, 100)) == [8, 9, 10]


async def test_prune_never_removes_a_rooms_newest_message(backend: Backend) -> None:
    store = backend.new()
    await store.open()
    await store.append([msg("dev", s) for s in range(1, 6)])
    assert await prune_all(store, "dev", before_ts=2_000_000_000.0) == 4
    assert await prune_all(store, "dev", keep=1) == 0
    await store.close()
    again = backend.new()
    await again.open()
    assert (await again.heads())["dev"] == 5  # the next seq a broker hands out is 6
    assert seqs(await again.range("dev", 0, 100)) == [5]
    await again.close()


async def test_prune_with_nothing_to_do_changes_nothing(storage: Storage) -> None:
    await storage.append([msg("dev", s) for s in range(1, 4)])
    assert await storage.prune("dev") == 0  # no policy
    assert await storage.prune("dev", keep=10) == 0
    assert await storage.prune("dev", before_ts=1.0) == 0
    assert await storage.prune("nowhere", keep=1) == 0
    assert seqs(await storage.range("dev", 0, 100)) == [1, 2, 3]


async def test_a_write_the_store_cannot_take_is_storage_unavailable_and_stores_nothing(storage: Storage) -> None:
    """Disk full / read-only (SQLite: query_only) or out of memory (Redis: maxmemory with
    noeviction): StorageUnavailable, which the broker answers storage_unavailable."""
    from zchat.storage import StorageUnavailable

    await storage.append([msg("dev", 1), msg("dev", 2)])
    if isinstance(storage, SqliteStorage):
        block = lambda: storage._db.execute("PRAGMA query_only=1")  # noqa: E731
        unblock = lambda: storage._db.execute("PRAGMA query_only=0")  # noqa: E731
    else:
        import redis

        assert isinstance(storage, RedisStorage)
        admin = redis.Redis.from_url(storage.url)
        old = admin.config_get("maxmemory")["maxmemory"]
        block = lambda: admin.config_set("maxmemory", 1)  # noqa: E731
        unblock = lambda: admin.config_set("maxmemory", old)  # noqa: E731
    block()
    try:
        with pytest.raises(StorageUnavailable):
            await storage.append([msg("dev", 3)], [("dev", "bob", True)])
        if isinstance(storage, SqliteStorage):  # (Redis takes deletes when out of memory)
            with pytest.raises(StorageUnavailable):
                await storage.prune("dev", keep=1)
    finally:
        unblock()
    assert seqs(await storage.range("dev", 0, 100)) == [1, 2]
    assert "bob" not in (await storage.members()).get("dev", set())
    await storage.append([msg("dev", 3)])  # recovered by itself
    assert seqs(await storage.range("dev", 0, 100)) == [1, 2, 3]
