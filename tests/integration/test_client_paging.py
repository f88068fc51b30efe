"""The client against the broker's newer contract: paged who/rooms/history (``more``),
rate_limited requests (``retry_after``), Heads on subscription, look-only sessions.

Where the real broker does not do it yet, a scripted broker on real sockets (ROUTER and
XPUB on 127.0.0.1, PLAIN with a ZAP handler that lets everyone in) answers as the
contract says; the real-broker versions check the same against a real broker.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable

import pytest
import zmq
import zmq.asyncio

from zchat import keys

from tests.conftest import RunningBroker, chat, collect, wait_for
from zchat import protocol as p
from zchat.client import Client, ClientError
from zchat.core import Limits
from zchat.recovery import Gap

EPOCH, BOOT = "E1", "B1"


class ScriptedBroker:
    """Answers hello and ping itself and hands every other request to ``answer`` (which
    returns the replies to send); publishes what a test asks on its XPUB."""

    def __init__(self, answer: Callable[[p.Request | p.Send], list[p.Reply]], heartbeat: float = 60.0) -> None:
        # 60 s: the first ping comes 12-72 s in (zchat.client's first jitter), so what a
        # test waits for a few seconds cannot have come by a heartbeat instead
        self.answer = answer
        self.heartbeat = heartbeat
        self.heads: dict[str, int] = {}
        self.requests: list[p.Request] = []
        self.subscriptions: list[bytes] = []
        self.ctx = zmq.asyncio.Context()
        self.zap = self._sock(zmq.REP)
        self.zap.bind("inproc://zeromq.zap.01")
        self.router = self._sock(zmq.ROUTER, plain_server=True)
        self.port = self.router.bind_to_random_port("tcp://127.0.0.1")
        keys.declare_insecure(f"tcp://127.0.0.1:{self.port}")  # it speaks PLAIN, as the broker's test-only mode
        self.xpub = self._sock(zmq.XPUB, plain_server=True)
        self.pub_port = self.xpub.bind_to_random_port("tcp://127.0.0.1")
        self.task: asyncio.Task | None = None

    def _sock(self, kind: int, **opts: object) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        for key, value in opts.items():
            setattr(sock, key, value)
        return sock

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> "ScriptedBroker":
        self.task = asyncio.ensure_future(asyncio.gather(self._zap(), self._serve(), self._subs()))
        return self

    async def _zap(self) -> None:
        while True:
            version, request_id, *_ = await self.zap.recv_multipart()
            await self.zap.send_multipart([version, request_id, b"200", b"OK", b"user", b""])

    async def _subs(self) -> None:
        while True:
            self.subscriptions.append(await self.xpub.recv())

    async def _serve(self) -> None:
        while True:
            sid, body = await self.router.recv_multipart()
            req = p.decode_router(body)
            self.requests.append(req)
            if isinstance(req, p.Hello):
                replies: list[p.Reply] = [p.Welcome(rid=req.rid, name="x", epoch=EPOCH, boot=BOOT, pull_port=self.port, pub_port=self.pub_port,
                                                    heartbeat=self.heartbeat, max_bytes=p.MAX_MESSAGE_BYTES, rate=0, burst=0)]
            elif isinstance(req, p.Ping):
                replies = [p.Pong(rid=req.rid, boot=BOOT, epoch=EPOCH, heads=dict(self.heads))]
            else:
                replies = self.answer(req)
            for reply in replies:
                await self.router.send_multipart([sid, p.encode(reply)])

    async def publish(self, topic: bytes, body: p.Event) -> None:
        await self.xpub.send_multipart([topic, p.encode(body)])

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.ctx.destroy(linger=0)
        keys.undeclare_insecure(self.endpoint)  # a CURVE broker may get this port next


def msg(room: str, seq: int) -> p.Msg:
    return p.Msg(room=room, seq=seq, id=f"id{seq}", ts=1.0, sender="bob", text=f"m{seq}", epoch=EPOCH)


async def scripted(answer: Callable[[p.Request], list[p.Reply]], name: str = "alice", **kwargs: object) -> tuple[ScriptedBroker, Client]:
    broker = ScriptedBroker(answer).start()
    client = Client(broker.endpoint, name, "secret-of-alice-0123456789", **kwargs)  # type: ignore[arg-type]
    try:
        await client.connect(timeout=30)  # an in-process broker on a loaded machine: 5 s was short (load 5)
    except BaseException:
        await broker.stop()  # not left to the garbage collector: a Context destroyed there can hang the run
        raise
    return broker, client


async def close(broker: ScriptedBroker, client: Client) -> None:
    await client.close()
    await broker.stop()


# ------------------------------------------------------------ paged lists


async def test_who_and_rooms_follow_more_to_the_last_page() -> None:
    """fails on main: only the first page was returned."""
    names = [f"user{i:03d}" for i in range(25)]

    def answer(req: p.Request) -> list[p.Reply]:
        if isinstance(req, p.Who):
            page = [n for n in names if n > req.after][:10]
            return [p.WhoReply(rid=req.rid, room=req.room, members=[p.Member(n, False) for n in page], more=page[-1] != names[-1])]
        if isinstance(req, p.Rooms):
            page = [n for n in names if n > req.after][:7]
            return [p.RoomsReply(rid=req.rid, rooms=[p.RoomInfo(n, 1, 0) for n in page], more=page[-1] != names[-1])]
        raise AssertionError(req)

    broker, client = await scripted(answer)
    try:
        assert [m.name for m in await client.who("general")] == names
        assert [r.name for r in await client.rooms()] == names
        afters = [(type(r).__name__, r.after) for r in broker.requests if isinstance(r, (p.Who, p.Rooms))]
        assert afters[:4] == [("Who", ""), ("Who", "user009"), ("Who", "user019"), ("Rooms", "")]
    finally:
        await close(broker, client)


async def test_a_list_that_never_ends_is_cut_at_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from zchat.client import requests as zc  # who() and rooms() read the bound there

    monkeypatch.setattr(zc, "MAX_LIST_PAGES", 5)
    count = 0

    def answer(req: p.Request) -> list[p.Reply]:
        nonlocal count
        count += 1
        assert isinstance(req, p.Rooms)
        return [p.RoomsReply(rid=req.rid, rooms=[p.RoomInfo(f"r{count:05d}", 1, 0)], more=True)]

    broker, client = await scripted(answer)
    try:
        assert len(await client.rooms()) == 5
    finally:
        await close(broker, client)


async def test_history_returns_all_that_was_asked_across_cut_pages() -> None:
    """fails on main: a page cut by the broker's byte cap was returned as if it were all."""
    head = 50

    def answer(req: p.Request) -> list[p.Reply]:
        assert isinstance(req, p.History)
        upper = (req.before or head + 1) - 1
        if req.after >= 0:
            seqs = list(range(req.after + 1, upper + 1))[: req.limit]
        else:
            seqs = list(range(max(1, upper - req.limit + 1), upper + 1))
        page = seqs[:8]  # the "byte cap": eight a reply
        return [p.HistoryReply(rid=req.rid, room=req.room, epoch=EPOCH, head=head, messages=[msg(req.room, s) for s in page], more=len(seqs) > 8)]

    broker, client = await scripted(answer)
    try:
        assert [m.seq for m in await client.history("general", limit=30)] == list(range(21, 51))
        assert [m.seq for m in await client.history("general", limit=20, before=41)] == list(range(21, 41))
        assert [m.seq for m in await client.history("general", limit=12, after=4)] == list(range(5, 17))
    finally:
        await close(broker, client)


# ------------------------------------------------------------ rate limits


async def test_a_rate_limited_request_waits_and_is_asked_again() -> None:
    """fails on main: the first rate_limited refusal was raised to the caller."""
    refusals = 0

    def answer(req: p.Request) -> list[p.Reply]:
        nonlocal refusals
        assert isinstance(req, p.Rooms)
        if refusals < 2:
            refusals += 1
            return [p.Error(code=p.ErrorCode.RATE_LIMITED, message="slow down: try again in 0.20s", rid=req.rid, retry_after=0.2)]
        return [p.RoomsReply(rid=req.rid, rooms=[p.RoomInfo("general", 1, 0)])]

    broker, client = await scripted(answer)
    try:
        start = time.monotonic()
        assert [r.name for r in await client.rooms()] == ["general"]
        assert time.monotonic() - start >= 0.4  # it waited the two retry_after
        assert refusals == 2
    finally:
        await close(broker, client)


async def test_a_long_rate_limit_wait_is_an_error_that_says_how_long() -> None:
    def answer(req: p.Request) -> list[p.Reply]:
        return [p.Error(code=p.ErrorCode.RATE_LIMITED, message="slow down: try again in 60.00s", rid=req.rid, retry_after=60.0)]  # type: ignore[union-attr]

    broker, client = await scripted(answer)
    try:
        with pytest.raises(ClientError) as err:
            await client.rooms()
        assert (err.value.code, err.value.retry_after) == (p.ErrorCode.RATE_LIMITED, 60.0)
        assert sum(isinstance(r, p.Rooms) for r in broker.requests) == 1  # not asked again into a long wait
    finally:
        await close(broker, client)


# ------------------------------------------------------------ Heads


async def test_heads_make_a_missed_line_arrive_at_once() -> None:
    """fails on main: the Heads event was ignored; the line came at the next heartbeat."""

    def answer(req: p.Request) -> list[p.Reply]:
        if isinstance(req, p.Join):
            return [p.Joined(rid=req.rid, room=req.room, head=3, epoch=EPOCH)]
        if isinstance(req, p.History):
            seqs = [s for s in range(req.after + 1, 5) if not req.before or s < req.before][: req.limit]
            return [p.HistoryReply(rid=req.rid, room=req.room, epoch=EPOCH, head=4, messages=[msg(req.room, s) for s in seqs])]
        raise AssertionError(req)

    broker, client = await scripted(answer)
    try:
        await client.join("general")
        await wait_for(lambda: b"\x01" + p.room_topic("general") in broker.subscriptions, what="the room subscription")
        # seq 4 was published before the subscription took effect: only Heads tells of it
        await broker.publish(p.inbox_topic("alice"), p.Heads(epoch=EPOCH, heads={"general": 4}))
        got = await chat(client, 1, timeout=6.0)  # the first heartbeat comes 12 s in at the earliest (2 s was short at load 5)
        assert [m.seq for m in got] == [4]
        # a DM conversation the client does not know yet starts from its first message
        await broker.publish(p.inbox_topic("alice"), p.Heads(epoch=EPOCH, heads={"@alice:bob": 2}))
        got = await chat(client, 4, timeout=6.0)
        assert [(m.room, m.seq) for m in got] == [("@alice:bob", s) for s in (1, 2, 3, 4)]
        # Heads of another epoch (a reset the client has not seen yet) change nothing
        await broker.publish(p.inbox_topic("alice"), p.Heads(epoch="E0", heads={"general": 99}))
        await broker.publish(p.room_topic("general"), msg("general", 5))  # a positive marker behind it
        assert [m.seq for m in await chat(client, 1, timeout=6.0)] == [5]
        assert client._trackers["general"].known_head == 5
    finally:
        await close(broker, client)


# ------------------------------------------------------------ the real broker


async def test_a_line_between_joined_and_the_subscription_arrives_at_once(tmp_path: Path) -> None:
    running = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=60, rate=0)).start()
    alice = Client(running.endpoint, "alice", "secret-of-alice-0123456789")
    bob = Client(running.endpoint, "bob", "secret-of-bob-0123456789")
    try:
        for c in (alice, bob):
            await c.connect(timeout=30)
        await alice.join("general")
        held: list = []
        submit = bob._sub.submit
        bob._sub.submit = held.append  # type: ignore[method-assign]  # hold bob's SUBSCRIBE back...
        await bob.join("general")
        bob._sub.submit = submit  # type: ignore[method-assign]
        assert len(held) == 1
        await alice.send("general", "between")  # ...so this is stored and published before it
        submit(held[0])
        got = await chat(bob, 1, timeout=6.0)  # the first heartbeat (12 s in at the earliest) would be too late
        assert [m.text for m in got] == ["between"]
    finally:
        for c in (alice, bob):
            await c.close()
        await running.stop()


async def test_a_looker_may_look_but_not_speak(connect) -> None:
    alice = await connect("alice")
    await alice.join("general")
    await alice.send("general", "public")
    looker = Client.looker(alice.broker)
    await looker.connect()
    try:
        assert await looker.ping() > 0
        assert [r.name for r in await looker.rooms()] == ["general"]
        assert [m.name for m in await looker.who("general")] == ["alice"]
        assert [m.text for m in await looker.history("general") if m.kind == "text"] == ["public"]
        with pytest.raises(ClientError) as err:
            await looker.join("general")
        assert err.value.code == p.ErrorCode.FORBIDDEN
    finally:
        await looker.close()


async def test_send_errors_by_cid_fail_or_keep_the_send() -> None:
    """bad_request and too_large with a cid fail that send; internal keeps it pending until acked."""
    seen: dict[str, int] = {}

    def answer(req: p.Request | p.Send) -> list[p.Reply]:
        assert isinstance(req, p.Send), req
        seen[req.text] = seen.get(req.text, 0) + 1
        stored = p.Stored(req.cid, "general", len(seen), f"id{len(seen)}", 1.0)
        if req.text == "flaky" and seen["flaky"] == 1:
            return [p.Error(code=p.ErrorCode.INTERNAL, message="could not store the message; resend it", cid=req.cid)]
        if req.text in ("bad", "huge"):
            code = p.ErrorCode.BAD_REQUEST if req.text == "bad" else p.ErrorCode.TOO_LARGE
            return [p.Error(code=code, message="no", cid=req.cid)]
        return [p.Ack(stored=[stored])]

    broker, client = await scripted(answer, ack_timeout=0.3)
    try:
        for text, code in (("bad", p.ErrorCode.BAD_REQUEST), ("huge", p.ErrorCode.TOO_LARGE)):
            with pytest.raises(ClientError) as err:
                await client.send("general", text, timeout=20)
            assert err.value.code == code
        stored = await client.send("general", "flaky", timeout=20)  # resent after ack_timeout, then acked
        assert stored.room == "general" and seen["flaky"] == 2
        assert (seen["bad"], seen["huge"]) == (1, 1)  # failed sends are not resent
    finally:
        await close(broker, client)


async def test_the_filler_carries_on_after_a_cut_page() -> None:
    """A history page cut by the byte cap (more) is not a loss: the filler asks again
    from its last seq, and nothing is reported missing."""
    head = 30

    def answer(req: p.Request | p.Send) -> list[p.Reply]:
        if isinstance(req, p.Join):
            return [p.Joined(rid=req.rid, room=req.room, head=head, epoch=EPOCH)]
        assert isinstance(req, p.History) and req.after >= 0, req
        seqs = [s for s in range(req.after + 1, head + 1) if not req.before or s < req.before][: req.limit]
        return [p.HistoryReply(rid=req.rid, room=req.room, epoch=EPOCH, head=head, messages=[msg(req.room, s) for s in seqs[:8]], more=len(seqs) > 8)]

    broker, client = await scripted(answer)
    try:
        await client.join("general", history=head)
        got = await collect(client, head, timeout=20, kinds=(p.Msg, Gap))
        assert [m.seq for m in got] == list(range(1, head + 1))  # no Gap among them
        assert [r.after for r in broker.requests if isinstance(r, p.History)] == [0, 8, 16, 24]
    finally:
        await close(broker, client)
