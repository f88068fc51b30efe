"""Faults injected into a real broker: storage that fails, queries that fail, handlers
that raise. Nothing stored may be lost or doubled, no seq may be skipped or reused, and
the broker keeps serving everyone else."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
import zmq
import zmq.asyncio

from zchat import protocol as p
from zchat.client import Client, ClientError, Gap

from tests.conftest import RunningBroker, chat, wait_for


def fail_appends(broker: RunningBroker, times: int, exc: Exception) -> list[int]:
    """Make the broker's next ``times`` storage appends raise ``exc``; returns a counter."""
    storage = broker.broker.storage  # type: ignore[union-attr]
    real = storage.append
    failures = [0]

    async def append(messages, members=()):  # type: ignore[no-untyped-def]
        if failures[0] < times and messages:
            failures[0] += 1
            raise exc
        await real(messages, members)

    storage.append = append
    return failures


@pytest.mark.parametrize(
    "exc", [OSError(5, "Input/output error"), sqlite3.OperationalError("disk I/O error"), RuntimeError("bug")],
    ids=["oserror", "sqlite3", "bug"],
)
async def test_a_line_storage_failed_is_resent_and_stored_once_with_no_hole(broker: RunningBroker, connect, exc) -> None:
    """Any failure to store (not only StorageError) undoes the batch and answers internal:
    before, the core kept the cid and the advanced head, acked the resend from dedup and
    never stored the line."""
    alice = await connect("alice", ack_timeout=0.3)
    bob = await connect("bob")
    await alice.join("dev")
    await bob.join("dev")
    await alice.send("dev", "before")
    failures = fail_appends(broker, 1, exc)
    stored = await alice.send("dev", "through the fault", timeout=10)
    assert failures[0] == 1
    after = await alice.send("dev", "after")
    history = await alice.history("dev", 100)
    texts = [m.text for m in history if m.kind == "text"]
    assert texts == ["before", "through the fault", "after"]
    assert [m.seq for m in history] == list(range(1, len(history) + 1))  # no hole, no reuse
    assert stored.seq + 1 == after.seq
    got = await chat(bob, 3)
    assert [m.text for m in got] == texts
    assert not [e for e in _drain(bob) if isinstance(e, Gap)]


async def test_a_join_storage_failed_is_refused_and_leaves_no_member(broker: RunningBroker, connect) -> None:
    alice = await connect("alice")
    fail_appends(broker, 1, OSError(28, "No space left on device"))
    with pytest.raises(ClientError) as info:
        await alice.join("dev")
    assert info.value.code == p.ErrorCode.INTERNAL
    assert "alice" not in broker.core.members.get("dev", set())
    await alice.join("dev")  # storage is back: the join goes through, numbered from 1
    history = await alice.history("dev", 10)
    assert [(m.seq, m.kind, m.sender) for m in history] == [(1, "join", "alice")]
    assert await broker.broker.storage.members() == {"dev": {"alice"}}  # type: ignore[union-attr]


async def test_a_failing_history_query_costs_only_its_own_reply(broker: RunningBroker, connect) -> None:
    """One query that raised dropped every other history reply of its loop turn."""
    alice = await connect("alice")
    bob = await connect("bob")
    await alice.join("dev")
    await alice.join("ops")
    await bob.join("dev")
    for i in range(5):
        await alice.send("dev", f"d{i}")
        await alice.send("ops", f"o{i}")
    storage = broker.broker.storage  # type: ignore[union-attr]
    real = storage.last

    async def last(room, limit, before=0, max_bytes=0):  # type: ignore[no-untyped-def]
        if room == "ops":
            raise sqlite3.OperationalError("database disk image is malformed")
        return await real(room, limit, before, max_bytes=max_bytes)

    storage.last = last
    results = await asyncio.gather(
        *[alice.history("ops", 10) for _ in range(5)], *[bob.history("dev", 10) for _ in range(20)],
        return_exceptions=True,
    )
    bad, good = results[:5], results[5:]
    assert all(isinstance(r, ClientError) and r.code == p.ErrorCode.INTERNAL for r in bad), bad
    assert all(isinstance(r, list) and len([m for m in r if m.kind == "text"]) == 5 for r in good), good


async def test_a_history_past_int64_is_refused_and_others_are_answered(broker: RunningBroker, connect) -> None:
    """after >= 2**63 overflowed SQLite; every other history reply of that turn was lost
    (another user got 0 of 50 answers while one user looped on it)."""
    alice = await connect("alice")
    await alice.join("dev")
    await alice.send("dev", "hello")
    ctx = zmq.asyncio.Context.instance()
    rogue = ctx.socket(zmq.DEALER)
    rogue.linger = 0
    rogue.plain_username, rogue.plain_password = b"mallory", b"secret-of-mallory-0123456789"
    rogue.routing_id = b"mallory-dealer-1"
    rogue.connect(broker.endpoint)
    try:
        await rogue.send(p.encode(p.Hello(rid=1)))
        assert isinstance(p.decode_reply(await asyncio.wait_for(rogue.recv(), 5)), p.Welcome)
        bad = msgspec_raw({"k": "history", "v": 1, "rid": 2, "room": "dev", "after": 2**63, "limit": 10})
        for _ in range(10):  # (a peer that reads nothing gets 16 replies queued at most)
            await rogue.send(bad)
        answers = await asyncio.gather(*[alice.history("dev", 10) for _ in range(50)])
        assert all([m.text for m in a if m.kind == "text"] == ["hello"] for a in answers)
        errors = [p.decode_reply(await asyncio.wait_for(rogue.recv(), 5)) for _ in range(10)]
        assert {(e.code, e.rid) for e in errors} == {(p.ErrorCode.BAD_REQUEST, 2)}  # type: ignore[union-attr]
    finally:
        rogue.close(linger=0)


async def test_an_exception_in_input_handling_never_stops_the_broker(broker: RunningBroker, connect) -> None:
    alice = await connect("alice")
    core = broker.core
    real = core.may_subscribe
    calls = [0]

    def boom(name: str, topic: bytes) -> bool:
        calls[0] += 1
        raise RuntimeError("bug in may_subscribe")

    core.may_subscribe = boom
    try:
        await alice.join("dev")  # its subscription hits the bug
        await wait_for(lambda: calls[0] > 0, what="the subscription to reach the bug")
    finally:
        core.may_subscribe = real
    assert await alice.ping() < 5  # still serving
    bob = await connect("bob")
    await bob.join("dev")
    assert (await bob.send("dev", "still here")).seq >= 1
    assert not broker.task.done()  # type: ignore[union-attr]


def msgspec_raw(fields: dict) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(fields)


def _drain(client: Client) -> list:
    events: list = []
    while not client._events.empty():  # noqa: SLF001 - what is queued right now
        chunk = client._events.get_nowait()  # noqa: SLF001
        if chunk:
            events += chunk
    return events
