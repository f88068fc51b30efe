"""Send-only clients (``join(room, receive=False)``) over a real broker: their lines are
stored and reach the room, the room's traffic never reaches them, a broker reset joins
them again, and ``post_many`` settles a whole bulk of lines with one future."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import chat, collect, wait_for
from zchat import protocol as p
from zchat.client import Client, ClientError, Event


async def _spy_topics(client: Client) -> list[bytes]:
    """Every topic frame that comes out of ``client``'s SUB socket from now on: the spy
    goes in through the socket's own queue, after what was submitted before it (an
    unsubscription), and SUB filters what it receives."""
    seen: list[bytes] = []
    on_recv = client._sub.on_recv

    def spy(frames: list[bytes]) -> None:
        seen.append(frames[0])
        on_recv(frames)  # type: ignore[misc]

    client._sub.submit(lambda s: setattr(client._sub, "on_recv", spy))
    await wait_for(lambda: client._sub.on_recv is spy, what="spy installed")
    return seen


def _record(client: Client) -> list[Event]:
    got: list[Event] = []
    client.listen(got.extend)
    return got


async def test_send_only_lines_are_stored_and_delivered(connect, broker) -> None:
    alice, bot = await connect("alice"), await connect("bot")
    await alice.join("general")
    members = await bot.join("general", receive=False)
    assert "bot" in {m.name for m in members}
    assert "bot" in broker.core.members["general"]
    stored = [await bot.send("general", f"build {i} passed") for i in range(3)]
    assert [s.seq for s in stored] == sorted(s.seq for s in stored)
    assert [m.text for m in await chat(alice, 3)] == [f"build {i} passed" for i in range(3)]
    assert [m.text for m in await alice.history("general", 3)] == [f"build {i} passed" for i in range(3)]


async def test_send_only_receives_nothing_of_the_room(connect) -> None:
    """Guard: with the receive=False branch of join() taken out (it subscribes like any
    join), the room's lines reach the bot's SUB and its events, and this fails."""
    bot = await connect("bot")
    topics, events = await _spy_topics(bot), _record(bot)
    await bot.join("general", receive=False)
    alice = await connect("alice")
    await alice.join("general")
    await alice.send("general", "a line for the room")
    await bot.send("general", "the bot's own line")
    assert [m.text for m in await chat(alice, 2)] == ["a line for the room", "the bot's own line"]
    # Positive marker: published after the room's lines, on the bot's inbox.
    await alice.send_dm("bot", "marker")
    await wait_for(lambda: any(isinstance(e, p.Msg) and e.text == "marker" for e in events), what="the marker DM")
    assert p.room_topic("general") not in topics, "the room's publications reached a send-only client"
    room_events = [e for e in events if getattr(e, "room", None) == "general"]
    assert room_events == [], room_events
    assert bot.cursors() == {"@alice:bot": (bot.epoch, 1)}


async def test_send_only_then_join_to_receive(connect) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await bob.join("general", receive=False)
    await alice.send("general", "before")
    await bob.join("general")  # now receiving: new lines only
    await alice.send("general", "after")
    assert [m.text for m in await chat(bob, 1)] == ["after"]
    await bob.join("general", receive=False)  # and back to posting only
    topics = await _spy_topics(bob)
    await alice.send("general", "not for bob")
    await alice.send_dm("bob", "marker")
    assert [m.text for m in await chat(bob, 1)] == ["marker"]
    assert p.room_topic("general") not in topics


async def test_send_only_room_is_joined_again_after_a_reset(connect, broker, tmp_path: Path) -> None:
    """Guard: with the send-only rooms left out of the rejoin after a new epoch, the
    bot's send after the reset is refused (not_member) and this fails."""
    alice, bot = await connect("alice"), await connect("bot")
    await alice.join("general")
    await bot.join("general", receive=False)
    await broker.stop()
    broker.path = tmp_path / "replacement.db"  # new history: new epoch, rooms forgotten
    await broker.start()
    await wait_for(lambda: bot.epoch == broker.core.epoch and bot.state == "connected", timeout=15, what="bot on the new epoch")
    await wait_for(lambda: alice.epoch == broker.core.epoch and alice.state == "connected", timeout=15, what="alice on the new epoch")
    await wait_for(lambda: "bot" in broker.core.members.get("general", ()), timeout=15, what="bot joined again")
    topics = await _spy_topics(bot)
    await bot.send("general", "after the reset", timeout=15)
    assert [m.text for m in await chat(alice, 1, timeout=15)] == ["after the reset"]
    await alice.send_dm("bot", "marker")
    await collect(bot, 1, where=lambda e: getattr(e, "text", "") == "marker")
    assert p.room_topic("general") not in topics, "the rejoin subscribed a send-only room"


async def test_kicked_send_only_client_is_no_longer_a_member(connect) -> None:
    """Guard: with the send-only branch of _taken_out removed, the kicked room stays in
    joined_info (and would be joined again after a reset) and this fails."""
    op = await connect("op")
    await op.join("general")
    bot = await connect("bot")
    await bot.join("general", receive=False)
    # The kick reaches a send-only client on its inbox only: make sure that is live
    # first (a full CI run once kicked before the bot's SUB took effect, and lost it).
    await op.send_dm("bot", "inbox live?")
    await collect(bot, 1, where=lambda e: getattr(e, "text", "") == "inbox live?")
    await op.kick("general", "bot", "spam")
    kick = (await collect(bot, 1, where=lambda e: getattr(e, "kind", "") == "kick"))[0]
    assert kick.room == "general"
    await wait_for(lambda: "general" not in bot.joined_info, what="the room forgotten")
    try:
        await bot.send("general", "still here?", timeout=5)
    except ClientError as exc:
        assert exc.code == p.ErrorCode.NOT_MEMBER
    else:
        raise AssertionError("a kicked client could still send")


# ------------------------------------------------------------------ post_many


async def test_post_many_settles_every_line_in_order(connect) -> None:
    """fails on main: there was no post_many (one future per line was the only way)."""
    alice, bot = await connect("alice"), await connect("bot")
    await alice.join("general")
    await bot.join("general", receive=False)
    texts = [f"line {i}" for i in range(600)]  # three frames' worth (256 items a frame)
    outcomes = await bot.post_many("general", texts)
    assert all(isinstance(o, p.Stored) for o in outcomes)
    seqs = [o.seq for o in outcomes]
    assert seqs == list(range(seqs[0], seqs[0] + 600))
    assert len({o.cid for o in outcomes}) == 600
    assert [m.text for m in await chat(alice, 600)] == texts
    assert bot._pending == {}


async def test_post_many_reports_a_refused_line_in_its_place(connect) -> None:
    alice = await connect("alice")
    await alice.join("general")
    outcomes = await alice.post_many("general", ["first", "   ", "third"])  # a blank line is refused
    assert isinstance(outcomes[0], p.Stored) and isinstance(outcomes[2], p.Stored)
    assert isinstance(outcomes[1], ClientError) and outcomes[1].code == p.ErrorCode.BAD_REQUEST
    assert outcomes[2].seq == outcomes[0].seq + 1


async def test_post_many_too_large_queues_nothing(connect) -> None:
    alice = await connect("alice")
    await alice.join("general")
    count = alice._cid_count
    try:
        alice.post_many("general", ["fine", "x" * (alice.max_bytes + 1)])
    except ClientError as exc:
        assert exc.code == p.ErrorCode.TOO_LARGE
    else:
        raise AssertionError("an over-long line was queued")
    assert alice._pending == {} and alice._outbox == [] and alice._cid_count == count
    assert await alice.post_many("general", []) == []


async def test_post_many_lost_acks_are_resent_and_stored_once(connect) -> None:
    """Nothing twice: the first ack of 200 lines is dropped, those lines resent with their
    cids after ack_timeout, and the broker's dedup answers with the first Stored.
    Guard: with the broker's dedup lookup disabled (zchat/core/lines.py), it fails."""
    alice = await connect("alice", ack_timeout=0.5)
    await alice.join("general", receive=False)
    alice._own = lambda msg: None  # type: ignore[method-assign]  # (not subscribed anyway)
    real, dropped = alice._acked, set()

    def lose_first_acks(cid: str, stored: p.Stored) -> None:
        if len(dropped) < 200 and cid not in dropped:
            dropped.add(cid)  # the first ack of this line never arrived
            return
        real(cid, stored)

    alice._acked = lose_first_acks  # type: ignore[method-assign]
    outcomes = await alice.post_many("general", [f"once {i}" for i in range(300)])
    assert dropped, "no ack was dropped"
    assert all(isinstance(o, p.Stored) for o in outcomes)
    history = await alice.history("general", 1000)
    texts = [m.text for m in history if m.kind == "text"]
    assert texts == [f"once {i}" for i in range(300)]


async def test_post_many_across_a_broker_restart(connect, broker) -> None:
    """Nothing lost, nothing twice, in order: lines posted while the broker is down are
    resent to the restarted one (same history) and stored once each."""
    alice = await connect("alice", ack_timeout=0.5)
    await alice.join("general")
    before = await alice.post_many("general", [f"before {i}" for i in range(50)])
    await broker.stop()
    during = alice.post_many("general", [f"during {i}" for i in range(50)])
    await broker.start()
    outcomes = await during
    assert all(isinstance(o, p.Stored) for o in outcomes)
    assert [o.seq for o in outcomes] == list(range(before[-1].seq + 1, before[-1].seq + 51))
    texts = [m.text for m in await alice.history("general", 1000) if m.kind == "text"]
    assert texts == [f"before {i}" for i in range(50)] + [f"during {i}" for i in range(50)]
