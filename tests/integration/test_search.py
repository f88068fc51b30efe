"""``search`` end to end on a real broker: who finds what (public rooms, private rooms
for their members, DMs for their two users), paging, the rate budget, and a Redis
broker's clear not_supported."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from tests.conftest import HEARTBEAT, RunningBroker, wait_for
from zchat import protocol as p
from zchat.client import Client, ClientError
from zchat.core import Limits
from zchat.storage import sqlite_search


def where(msgs: list[p.Msg]) -> list[tuple[str, str]]:
    return [(m.room, m.text) for m in msgs]


def stop_index_thread(running: RunningBroker) -> None:
    """Stop the broker's search index thread: what is stored next is never indexed."""
    index = running.broker.storage._search  # type: ignore[union-attr]
    index._stopping = True
    index._wake.set()
    index._hurry.set()
    index._thread.join(5)


async def test_search_finds_only_what_the_user_may_read(broker: RunningBroker, connect) -> None:  # type: ignore[no-untyped-def]
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    await alice.join("general")
    await bob.join("general")
    await alice.send("general", "the release is out")
    await alice.join("inner", private=True)
    await alice.send("inner", "release notes, members only")
    await alice.send_dm("bob", "a private release date")
    await bob.send("general", "Release party tonight", me=True)

    hits, more = await bob.search("release")
    assert where(hits) == [
        ("general", "Release party tonight"), ("@alice:bob", "a private release date"), ("general", "the release is out"),
    ]
    assert more == 0
    assert [h.sender for h in hits] == ["bob", "alice", "alice"] and all(h.seq > 0 and h.ts > 0 and h.epoch for h in hits)
    assert hits[0].kind == "me"
    carols, _ = await carol.search("release")  # not in the DM, not a member of #inner; public rooms are for anyone
    assert where(carols) == [("general", "Release party tonight"), ("general", "the release is out")]
    alices, _ = await alice.search("release", room="inner")
    assert where(alices) == [("inner", "release notes, members only")]
    for room, code in (("inner", p.ErrorCode.FORBIDDEN), ("@alice:bob", p.ErrorCode.NOT_MEMBER), ("nowhere", p.ErrorCode.UNKNOWN_ROOM)):
        with pytest.raises(ClientError) as info:
            await carol.search("release", room=room)
        assert info.value.code == code
    with pytest.raises(ClientError) as info:
        await carol.search("   ")
    assert info.value.code == p.ErrorCode.BAD_REQUEST
    await alice.invite("inner", "carol")
    await carol.join("inner")
    assert ("inner", "release notes, members only") in where((await carol.search("release"))[0])  # a member now


async def test_search_pages_newest_first(broker: RunningBroker, connect) -> None:  # type: ignore[no-untyped-def]
    alice = await connect("alice")
    await alice.join("general")
    for n in range(7):
        await alice.send("general", f"item {n}")
    page, more = await alice.search("item", limit=3)
    assert [m.text for m in page] == ["item 6", "item 5", "item 4"] and more
    rest, more = await alice.search("item", limit=10, before=more)
    assert [m.text for m in rest] == ["item 3", "item 2", "item 1", "item 0"] and more == 0


async def test_search_has_a_budget_of_its_own(tmp_path: Path) -> None:
    running = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=HEARTBEAT, search_rate=0.01, search_burst=2)).start()
    client = Client(running.endpoint, "alice", "secret-of-alice-0123456789")
    try:
        await client.connect()
        for _ in range(2):
            await client.search("anything")
        with pytest.raises(ClientError) as info:
            await client.search("anything")
        assert info.value.code == p.ErrorCode.RATE_LIMITED and info.value.retry_after > 0
        await client.ping()  # other requests still go
    finally:
        await client.close()
        await running.stop()


async def test_a_redis_broker_says_search_is_not_supported(tmp_path: Path, redis_url: str) -> None:
    from zchat.storage.redis import RedisStorage

    prefix = f"zchat-test-{secrets.token_hex(4)}:"
    running = await RunningBroker(tmp_path / "unused.db", Limits(heartbeat=HEARTBEAT), storage=lambda: RedisStorage(redis_url, prefix)).start()
    client = Client(running.endpoint, "alice", "secret-of-alice-0123456789")
    try:
        await client.connect()
        with pytest.raises(ClientError) as info:
            await client.search("anything")
        assert info.value.code == p.ErrorCode.NOT_SUPPORTED and "Redis" in info.value.message
    finally:
        await client.close()
        await running.stop()


async def test_a_search_waiting_for_the_index_holds_nobody_else(broker: RunningBroker, connect, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """fails on the loop that awaited the search in its turn: a search waits for the
    index thread to have every line stored before it, and the whole broker waited with
    it. Now it waits in a task of its own; here the thread is stopped, so the search
    ends in a clear storage_unavailable after WAIT_FOR_INDEX, and bob's ping, sent after
    it, is answered first."""
    monkeypatch.setattr(sqlite_search, "WAIT_FOR_INDEX", 3.0)
    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await alice.send("general", "findable words")
    assert where((await alice.search("findable"))[0]) == [("general", "findable words")]
    stop_index_thread(broker)
    await alice.send("general", "more words")  # past what the stopped thread indexed
    search = asyncio.ensure_future(alice.search("words"))
    await wait_for(lambda: bool(broker.broker.searching), what="the search under way")
    await bob.ping()
    assert not search.done()
    with pytest.raises(ClientError) as info:
        await search
    assert info.value.code == p.ErrorCode.STORAGE_UNAVAILABLE


async def test_a_search_refused_at_the_cap_is_answered_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fails on the loop that slept with the refusal queued (until its tick, 30 s here):
    past MAX_SEARCHING searches under way, the next is refused rate_limited in the turn
    that read it; the reply waits in ``searched``, which the loop must count as work
    before it sleeps."""
    from zchat.broker import search as searching

    monkeypatch.setattr(sqlite_search, "WAIT_FOR_INDEX", 20.0)
    monkeypatch.setattr(searching, "MAX_SEARCHING", 1)
    monkeypatch.setattr(searching, "SEARCHING_RETRY", 100.0)  # past the client's own retries: it raises
    running = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=60), tick=30).start()
    alice = Client(running.endpoint, "alice", "secret-of-alice-0123456789")
    try:
        await alice.connect()
        await alice.join("general")
        stop_index_thread(running)
        await alice.send("general", "words the stopped index never sees")
        first = asyncio.ensure_future(alice.search("words"))
        await wait_for(lambda: bool(running.broker.searching), what="the first search under way")  # type: ignore[union-attr]
        with pytest.raises(ClientError) as info:
            await asyncio.wait_for(alice.search("words"), 2.0)  # the client resends after 3 s
        assert info.value.code == p.ErrorCode.RATE_LIMITED
        first.cancel()
    finally:
        await alice.close()
        await running.stop()


async def test_search_index_lag_in_status(broker: RunningBroker, connect) -> None:  # type: ignore[no-untyped-def]
    """fails with the status that had no word of the index: an operator sees how far
    the index thread is behind (and its file's size), not only Prometheus."""
    alice = await connect("alice")
    await alice.join("general")
    await alice.send("general", "findable words")
    await alice.search("findable")  # the thread has every line
    status = await alice.status()
    assert status.search_behind == 0 and status.search_bytes > 0
    stop_index_thread(broker)
    await alice.send("general", "lines the stopped thread never indexes")
    assert (await alice.status()).search_behind >= 1
