"""Client state over a real broker: DM part, double joins, re-joins after a reset, the
filler's resilience, errors that name nothing, and packed frames within the limits."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import zmq

from tests.conftest import chat, collect, wait_for
from zchat import protocol as p
from zchat.client import Client, ClientError, Problem


async def test_dm_part_does_not_redeliver_the_conversation(connect) -> None:
    """fails on main: after part, the next DM re-delivers the whole conversation from #1."""
    alice, bob = await connect("alice"), await connect("bob")
    for i in range(3):
        await alice.send_dm("bob", f"dm {i}")
    assert [m.text for m in await chat(bob, 3)] == [f"dm {i}" for i in range(3)]
    await bob.part("@alice:bob")
    await alice.send_dm("bob", "after part")
    assert [m.text for m in await chat(bob, 1)] == ["after part"]
    assert bob.cursors()["@alice:bob"][1] == 4


async def test_join_twice_part_once_stops_the_room(connect) -> None:
    """fails on main: SUB counted two subscriptions, so after part the room kept arriving."""
    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await bob.join("general")
    await bob.join("general")
    seen: list[bytes] = []
    on_recv = bob._sub.on_recv

    def spy(frames: list[bytes]) -> None:
        seen.append(frames[0])
        on_recv(frames)  # type: ignore[misc]

    await bob.part("general")
    # install the spy after the unsubscription ran on bob's socket (its ops run in order):
    # SUB filters what it receives, so from here nothing of #general may come out of it
    bob._sub.submit(lambda s: setattr(bob._sub, "on_recv", spy))
    await wait_for(lambda: bob._sub.on_recv is spy, what="spy installed")
    await alice.send("general", "bob is gone")
    await alice.send_dm("bob", "marker")  # published after the room line: a positive marker
    assert [m.text for m in await chat(bob, 1)] == ["marker"]
    assert p.room_topic("general") not in seen, "the parted room still reached bob's socket"


async def test_rejoin_after_reset_goes_on_past_a_failing_room(connect, broker, tmp_path: Path) -> None:
    """fails on main: the re-join loop stopped at the first room that failed, for good."""
    alice, bob = await connect("alice"), await connect("bob")
    for room in ("aaa", "bbb", "ccc"):
        await alice.join(room)
        await bob.join(room)
    real = bob._request
    failed: list[str] = []

    async def flaky(make, *args, **kwargs):  # type: ignore[no-untyped-def]
        req = make(0)
        if isinstance(req, p.Join) and req.room == "aaa" and not failed:
            failed.append(req.room)
            raise ClientError(p.ErrorCode.INTERNAL, "a transient failure")
        return await real(make, *args, **kwargs)

    bob._request = flaky  # type: ignore[method-assign]
    await broker.stop()
    broker.path = tmp_path / "replacement.db"  # new history: new epoch, rooms forgotten
    await broker.start()
    await wait_for(lambda: failed and bob.epoch == broker.core.epoch and bob.state == "connected", timeout=15, what="bob on the new epoch")
    await wait_for(lambda: alice.epoch == broker.core.epoch and alice.state == "connected", timeout=15, what="alice on the new epoch")
    await alice.send("ccc", "after the failing room", timeout=15)
    assert [m.text for m in await chat(bob, 1, timeout=15)] == ["after the failing room"]
    await wait_for(lambda: "bob" in broker.core.members.get("aaa", ()), timeout=20, what="the failed room retried")
    await alice.send("aaa", "the failed one too", timeout=15)
    assert [m.text for m in await chat(bob, 1, timeout=15)] == ["the failed one too"]


async def test_filler_keeps_serving_after_a_bug(connect, caplog: pytest.LogCaptureFixture) -> None:
    """fails on main: an unexpected exception ended the filler task for the client's life."""
    alice = await connect("alice")
    await alice.join("general")
    for i in range(5):
        await alice.send("general", f"old {i}")
    bob = await connect("bob")
    real = bob._fill
    calls = 0

    async def buggy(room: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("a bug in the filler")
        await real(room)

    bob._fill = buggy  # type: ignore[method-assign]
    await bob.join("general", history=6)  # five lines and bob's join to fetch: the first try fails
    got = await chat(bob, 5, timeout=10)
    assert [m.text for m in got] == [f"old {i}" for i in range(5)]
    assert "filling general from history failed" in caplog.text


async def test_an_error_naming_nothing_reaches_the_caller(connect) -> None:
    """fails on main: an Error with neither rid nor cid was dropped without a trace."""
    alice = await connect("alice")
    alice._dealer.submit(lambda s: s.send(b"\xc1 not msgpack", zmq.NOBLOCK))
    (problem,) = await collect(alice, 1, kinds=(Problem,))
    assert problem.code == p.ErrorCode.BAD_ENCODING and problem.message


async def test_a_line_of_exactly_max_bytes_packed_behind_others_is_stored(connect, broker) -> None:
    """fails on the code before 08e5a07: sent alone but wrapped in a sends frame (the
    lines after it went in the next frame), the line was over the limit and refused."""
    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await bob.join("general")
    cid = f"{alice._cid_base}{alice._cid_count + 4}"  # the cid the fourth post below gets
    bare = len(p.encode(p.Send(sid=alice.sid, cid=cid, text="", room="general")))
    text = "y" * (alice.max_bytes - bare - 2)  # str8 -> str16 header: two bytes more
    assert len(p.encode(p.Send(sid=alice.sid, cid=cid, text=text, room="general"))) == alice.max_bytes
    futures = [alice.post("general", f"small {i}") for i in range(3)] + [alice.post("general", text), alice.post("general", "after")]
    stored = await asyncio.gather(*futures)
    assert [s.seq for s in stored] == list(range(stored[0].seq, stored[0].seq + 5))
    got = await chat(bob, 5)
    assert [m.text for m in got] == ["small 0", "small 1", "small 2", text, "after"]
    assert broker.core.counters.get("too_large", 0) == 0


class _Recorder:
    """Stands in for the DEALER in ``_flush``: keeps the frames it is given."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, data: bytes, flags: int = 0) -> None:
        self.frames.append(bytes(data))


async def test_packing_never_builds_a_frame_over_the_limits() -> None:
    """fails on the code before 08e5a07: 600 tiny lines went in one frame of 600 items."""
    client = Client("tcp://127.0.0.1:1", "alice", "secret-of-alice-0123456789")
    rng = random.Random(11)
    cases = [[10] * 600, [client.max_bytes - 200] * 3 + [10] * 300]  # many tiny lines; big ones then tiny
    cases += [[rng.choice([10, 100, 1000, 20_000, client.max_bytes - 200]) for _ in range(rng.randrange(1, 700))] for _ in range(20)]
    for sizes in cases:
        client._outbox = [p.encode(p.Send(sid="s", cid=f"c{i}", text="z" * n, room="general")) for i, n in enumerate(sizes)]
        sent = list(client._outbox)
        sock = _Recorder()
        client._flush(sock)  # type: ignore[arg-type]
        items: list[bytes] = []
        for frame in sock.frames:
            assert len(frame) <= client.max_bytes
            lines, bad = p.decode_sends(frame, client.max_bytes)
            assert not bad and len(lines) <= p.MAX_SENDS_ITEMS
            items += [p.encode(line) for line in lines]
        assert items == sent  # every line once, in order


def drop_inbox_lines(client: Client) -> list[int]:
    """Make ``client``'s SUB lose the DM lines on its inbox (as PUB may) while the
    returned list is empty; append anything to it to stop."""
    stop: list[int] = []
    on_recv = client._sub.on_recv
    inbox = p.inbox_topic(client.name)

    def lossy(frames: list[bytes]) -> None:
        if not stop and frames[0] == inbox and isinstance(p.decode_event(frames[1]), (p.Msg, p.Batch)):
            return
        on_recv(frames)  # type: ignore[misc]

    client._sub.on_recv = lossy
    return stop


async def test_a_dm_whose_first_line_was_lost_is_fetched(connect) -> None:
    """fails on main: a conversation's lost first line was never fetched (no tracker, so
    the pong's head for it was ignored)."""
    alice, bob = await connect("alice"), await connect("bob")
    stop = drop_inbox_lines(bob)
    await alice.send_dm("bob", "lost on the way")
    stop.append(1)
    got = await collect(bob, 1, timeout=5, where=lambda m: m.room == "@alice:bob")  # at the next heartbeat
    assert [m.text for m in got] == ["lost on the way"]


async def test_a_dm_begun_during_a_broker_restart_is_fetched_from_its_start(connect, broker) -> None:
    """fails on main: after the restart's welcome the new conversation was tracked from its
    head, so its lost first line was skipped without a Gap."""
    bob = await connect("bob")
    gate = asyncio.Event()
    rehello = bob._rehello

    async def gated() -> None:
        await gate.wait()
        await rehello()

    bob._rehello = gated  # type: ignore[method-assign]
    await broker.stop()
    await broker.start()
    stop = drop_inbox_lines(bob)
    alice = await connect("alice")
    await alice.send_dm("bob", "while you were reconnecting")
    stop.append(1)
    gate.set()
    got = await collect(bob, 1, timeout=10, where=lambda m: m.room == "@alice:bob")
    assert [m.text for m in got] == ["while you were reconnecting"]
