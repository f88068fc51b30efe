"""Editing and deleting one's own lines on a real broker: a sequenced edit or delete
line for everyone, the latest text (or a tombstone) in history, and nobody else's."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import RunningBroker, collect
from zchat import protocol as p
from zchat.client import ClientError
from zchat.storage import StorageUnavailable


def kinds(msgs: list[p.Msg]) -> list[tuple[int, str, str, int, int]]:
    return [(m.seq, m.kind, m.text, m.ref, m.edited) for m in msgs]


async def test_a_sender_edits_and_deletes_their_line_and_others_see_it(broker: RunningBroker, connect) -> None:  # type: ignore[no-untyped-def]
    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await bob.join("general")
    first = await alice.send("general", "meet at noon")
    second = await alice.send("general", "bring snacks", me=True)
    await alice.edit("general", first.seq, "meet at ten")
    got = await collect(bob, 3, where=lambda e: isinstance(e, p.Msg) and e.sender == "alice" and e.kind != "join")
    assert [(m.kind, m.text, m.ref) for m in got] == [("text", "meet at noon", 0), ("me", "bring snacks", 0), ("edit", "meet at ten", first.seq)]
    edit_seq = got[2].seq

    history = await bob.history("general")
    assert (history[-3].seq, history[-3].text, history[-3].edited) == (first.seq, "meet at ten", edit_seq)
    assert history[-1].kind == "edit" and history[-1].ref == first.seq  # the edit line is a record of its own
    assert [m.text for m in (await bob.search("ten"))[0]] == ["meet at ten"] and (await bob.search("noon"))[0] == []

    for work, code in (
        (bob.edit("general", first.seq, "mine now"), p.ErrorCode.FORBIDDEN),
        (bob.delete_own("general", first.seq), p.ErrorCode.FORBIDDEN),
        (alice.edit("general", 999, "x"), p.ErrorCode.BAD_REQUEST),
        (alice.edit("general", 1, "x"), p.ErrorCode.BAD_REQUEST),  # a join line
        (alice.edit("general", first.seq, "  "), p.ErrorCode.BAD_REQUEST),
        (alice.edit("elsewhere", 1, "x"), p.ErrorCode.NOT_MEMBER),
    ):
        with pytest.raises(ClientError) as info:
            await work
        assert info.value.code == code

    await alice.delete_own("general", second.seq)
    gone = await collect(bob, 1, where=lambda e: isinstance(e, p.Msg) and e.kind == "delete")
    assert (gone[0].ref, gone[0].text, gone[0].sender) == (second.seq, str(second.seq), "alice")
    stone = [m for m in await bob.history("general") if m.seq == second.seq][0]
    assert (stone.kind, stone.text) == ("deleted", "")
    with pytest.raises(ClientError) as info:
        await alice.edit("general", second.seq, "back again")
    assert info.value.code == p.ErrorCode.BAD_REQUEST
    after = await bob.history("general")
    assert [m.text for m in after if m.seq == first.seq] == ["meet at ten"]  # nothing else changed


async def test_edits_in_a_dm_reach_both(broker: RunningBroker, connect) -> None:  # type: ignore[no-untyped-def]
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    line = await alice.send_dm("bob", "hi bbo")
    await alice.edit(line.room, line.seq, "hi bob")
    got = await collect(bob, 2, where=lambda e: isinstance(e, p.Msg))
    assert [(m.kind, m.text, m.ref) for m in got] == [("text", "hi bbo", 0), ("edit", "hi bob", line.seq)]
    mine = await collect(alice, 2, where=lambda e: isinstance(e, p.Msg))
    assert mine[1].kind == "edit"
    with pytest.raises(ClientError) as info:
        await carol.edit(line.room, line.seq, "not mine")
    assert info.value.code == p.ErrorCode.NOT_MEMBER
    assert [(m.text, m.edited) for m in await bob.history(line.room) if m.kind == "text"] == [("hi bob", got[1].seq)]


async def test_a_line_that_cannot_be_read_is_an_internal_error_and_changes_nothing(broker: RunningBroker, connect, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    alice = await connect("alice")
    await alice.join("general")
    line = await alice.send("general", "keep me")
    storage = broker.broker.storage  # type: ignore[union-attr]

    async def broken(*args: object, **kwargs: object) -> list:  # type: ignore[type-arg]
        raise OSError("disk on fire")

    monkeypatch.setattr(storage, "range", broken)
    with pytest.raises(ClientError) as info:
        await alice.edit("general", line.seq, "changed")
    assert info.value.code == p.ErrorCode.INTERNAL
    monkeypatch.undo()
    assert [m.text for m in await alice.history("general") if m.kind in ("text", "edit")] == ["keep me"]


async def test_an_edit_and_a_delete_storage_refused_are_applied_once_it_is_back(broker: RunningBroker, connect) -> None:  # type: ignore[no-untyped-def]
    """The edit and delete lines are stored; changing the original line failed (storage
    down for a moment). The broker retries on its tick, in order, until storage takes
    them: history ends with the new text and the tombstone, not the old text for good."""
    alice = await connect("alice")
    await alice.join("general")
    first = await alice.send("general", "meet at noon")
    second = await alice.send("general", "oops, wrong room")
    storage = broker.broker.storage  # type: ignore[union-attr]
    real_edit, real_tombstone, refused = storage.edit, storage.tombstone, []

    def refusing(real):  # type: ignore[no-untyped-def]
        async def change(*args):  # type: ignore[no-untyped-def]
            if len(refused) < 4:
                refused.append(args)
                raise StorageUnavailable("disk on fire")
            return await real(*args)
        return change

    storage.edit, storage.tombstone = refusing(real_edit), refusing(real_tombstone)
    await alice.edit("general", first.seq, "meet at ten")
    await alice.delete_own("general", second.seq)

    deadline = time.monotonic() + 20
    while True:  # poll history: the retry comes with one of the broker's next ticks
        lines = {m.seq: m for m in await alice.history("general")}
        if lines[first.seq].text == "meet at ten" and lines[second.seq].kind == "deleted":
            break
        assert time.monotonic() < deadline, f"not applied: {lines[first.seq]!r} {lines[second.seq]!r}"
        await asyncio.sleep(0.05)
    assert len(refused) == 4
    lines = await alice.history("general")
    assert [m.kind for m in lines].count("edit") == 1 and [m.kind for m in lines].count("delete") == 1
