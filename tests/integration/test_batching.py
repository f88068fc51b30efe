"""Packed chat lines (``sends`` frames) and batched delivery, over real sockets."""

from __future__ import annotations

import asyncio

import msgspec
import zmq
import zmq.asyncio

from tests.conftest import chat, wait_for
from zchat import protocol as p


async def test_lines_posted_in_one_turn_travel_packed_and_arrive_in_order(connect, broker) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await bob.join("general")
    lines = [f"line {i}" for i in range(300)]
    stored = await asyncio.gather(*[alice.post("general", line) for line in lines])
    assert [s.seq for s in stored] == list(range(stored[0].seq, stored[0].seq + 300))
    # 300 short lines fit in one or two frames; each frame is one broker turn at most
    assert 1 <= broker.core.counters.get("packed_frames", 0) <= 3
    got = await chat(bob, 300)
    assert [m.text for m in got] == lines
    assert [m.text for m in await bob.history("general", limit=300)] == lines


async def test_batches_hand_over_what_arrived_together(connect) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await bob.join("general")
    await asyncio.gather(*[alice.post("general", f"b{i}") for i in range(200)])
    seen: list[str] = []
    chunks = 0

    async def read() -> None:
        nonlocal chunks
        async for batch in bob.batches():
            chunks += 1
            seen.extend(e.text for e in batch if isinstance(e, p.Msg) and e.kind == "text")
            if len(seen) >= 200:
                return

    await asyncio.wait_for(read(), 10)
    assert seen == [f"b{i}" for i in range(200)]
    assert chunks < 200  # at least some lines came together


async def test_big_lines_are_split_across_frames_within_the_limit(connect, broker) -> None:
    alice = await connect("alice")
    await alice.join("general")
    text = "é" * 3000  # 6,000 bytes of UTF-8: 100 of them need about ten 64 KiB frames
    stored = await asyncio.gather(*[alice.post("general", f"{i} {text}") for i in range(100)])
    assert len({s.seq for s in stored}) == 100
    assert broker.core.counters.get("too_large", 0) == 0
    assert broker.core.counters.get("packed_frames", 0) >= 10
    history = await alice.history("general", limit=100)
    assert [m.text.split(" ")[0] for m in history] == [str(i) for i in range(100)]


async def test_bad_lines_in_a_packed_frame_are_refused_one_by_one(connect, broker) -> None:
    bob = await connect("bob")
    await bob.join("general")
    ctx = zmq.asyncio.Context.instance()
    dealer, push = ctx.socket(zmq.DEALER), ctx.socket(zmq.PUSH)
    dealer.routing_id = b"mallory-session"
    for sock, port in ((dealer, broker.broker.ports[0]), (push, broker.broker.ports[1])):
        sock.linger = 0
        sock.plain_username, sock.plain_password = b"mallory", b"secret-of-mallory-0123456789"
        sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        await dealer.send(p.encode(p.Hello(rid=1)))
        assert await dealer.poll(5000)
        assert isinstance(p.decode_reply(await dealer.recv()), p.Welcome)
        await dealer.send(p.encode(p.Join(rid=2, room="general")))
        assert await dealer.poll(5000)
        assert isinstance(p.decode_reply(await dealer.recv()), p.Joined)

        def line(cid: str, **kw: object) -> msgspec.Raw:
            body = {"k": "send", "v": 1, "sid": "mallory-session", "cid": cid, "text": "hi", "room": "general", **kw}
            return msgspec.Raw(msgspec.msgpack.encode(body))

        frame = p.encode(p.Sends(items=[  # type: ignore[list-item]
            line("ok1"), line("wrong-type", text=5), line("no-room", room="nowhere"), line("bad-version", v=7), line("ok2"),
        ]))
        await push.send(frame)
        replies: list = []
        while sum(len(r.stored) if isinstance(r, p.Ack) else 1 for r in replies) < 5:
            assert await dealer.poll(5000), f"missing replies; got {replies}"
            replies.append(p.decode_reply(await dealer.recv()))
        errors = {r.cid: r.code for r in replies if isinstance(r, p.Error)}
        assert errors == {"wrong-type": p.ErrorCode.BAD_REQUEST, "no-room": p.ErrorCode.UNKNOWN_ROOM, "bad-version": p.ErrorCode.BAD_VERSION}
        acked = [s.cid for r in replies if isinstance(r, p.Ack) for s in r.stored]
        assert acked == ["ok1", "ok2"]
        # a frame that is not a sends body at all is one error, and nothing is stored
        await push.send(msgspec.msgpack.encode({"k": "sends", "v": 1, "sid": "mallory-session", "items": 5}))
        await wait_for(lambda: broker.core.counters.get("bad_request", 0) >= 2, what="bad frame counted")
    finally:
        dealer.close()
        push.close()
    got = await chat(bob, 2)
    assert [(m.sender, m.cid) for m in got] == [("mallory", "ok1"), ("mallory", "ok2")]
    assert [m.cid for m in await bob.history("general") if m.kind == "text"] == ["ok1", "ok2"]


async def test_a_listener_gets_every_event_in_order_and_survives_its_own_errors(connect) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await bob.join("general")
    await alice.send("general", "before listening")
    # the line itself must be queued (the queue already holds join lines and states)
    await wait_for(lambda: any(isinstance(e, p.Msg) and e.text == "before listening" for chunk in list(bob._events._queue) for e in chunk or ()),
                   what="the line queued")
    seen: list[str] = []
    calls = 0

    def handler(events: list) -> None:
        nonlocal calls
        calls += 1
        seen.extend(e.text for e in events if isinstance(e, p.Msg) and e.kind == "text")
        if calls == 1:
            raise RuntimeError("a bug in the listener")  # logged; delivery goes on

    bob.listen(handler)
    await asyncio.gather(*[alice.post("general", f"l{i}") for i in range(100)])
    await alice.send("general", "last")
    await wait_for(lambda: len(seen) >= 102, what="all lines at the listener")
    assert seen == ["before listening"] + [f"l{i}" for i in range(100)] + ["last"]
    bob.listen(None)  # back to the queue
    await alice.send("general", "queued again")
    assert [m.text for m in await chat(bob, 1)] == ["queued again"]


async def test_chat_lines_over_the_dealer_are_taken_like_pushed_ones(connect, broker) -> None:
    bob = await connect("bob")
    await bob.join("general")
    ctx = zmq.asyncio.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.routing_id = b"carol-session"
    dealer.linger = 0
    dealer.plain_username, dealer.plain_password = b"carol", b"secret-of-carol-0123456789"
    dealer.connect(f"tcp://127.0.0.1:{broker.broker.ports[0]}")

    async def replies(count: int) -> list:
        got: list = []
        while sum(len(r.stored) if isinstance(r, p.Ack) else 1 for r in got) < count:
            assert await dealer.poll(5000), f"missing replies; got {got}"
            got.append(p.decode_reply(await dealer.recv()))
        return got

    def line(cid: str, **kw: object) -> p.Send:
        return p.Send(**{"sid": "carol-session", "cid": cid, "text": f"via dealer {cid}", "room": "general", **kw})  # type: ignore[arg-type]

    try:
        await dealer.send(p.encode(p.Hello(rid=1)))
        await dealer.send(p.encode(p.Join(rid=2, room="general")))
        # requests and lines on one DEALER are taken in order: the join lands before the lines
        await dealer.send(p.encode(line("d1")))
        await dealer.send(p.encode(p.Sends(items=[line("d2"), line("spoof", sid="bob-session"), line("d3")])))
        got = await replies(6)
        assert [type(r).__name__ for r in got[:2]] == ["Welcome", "Joined"]
        acked = [s.cid for r in got if isinstance(r, p.Ack) for s in r.stored]
        assert acked == ["d1", "d2", "d3"]
        assert [(r.code, r.cid) for r in got if isinstance(r, p.Error)] == [(p.ErrorCode.BAD_REQUEST, "spoof")]
        # a sends frame with a bad line, sent over the DEALER: the good lines still land
        bad = msgspec.msgpack.encode({"k": "send", "v": 1, "sid": "carol-session", "cid": "d5", "text": 7})
        await dealer.send(p.encode(p.Sends(items=[msgspec.Raw(p.encode(line("d4"))), msgspec.Raw(bad)])))  # type: ignore[list-item]
        got = await replies(2)
        assert [s.cid for r in got if isinstance(r, p.Ack) for s in r.stored] == ["d4"]
        assert [(r.code, r.cid) for r in got if isinstance(r, p.Error)] == [(p.ErrorCode.BAD_REQUEST, "d5")]
    finally:
        dealer.close()
    texts = [m.text for m in await chat(bob, 4)]
    assert texts == ["via dealer d1", "via dealer d2", "via dealer d3", "via dealer d4"]
