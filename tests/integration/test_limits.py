"""Budgets, pages and dedup across a restart, through a real broker on real sockets
with a real SQLite file; raw ZeroMQ peers where the client library would hide it."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from tests.conftest import HEARTBEAT, RunningBroker
from zchat import protocol as p
from zchat.core import Limits


class RawPeer:
    """A DEALER speaking the protocol by hand (PLAIN-authenticated): its routing id is
    its session id, so it may send chat lines over the same socket."""

    def __init__(self, running: RunningBroker, name: str, sid: str) -> None:
        self.sid = sid
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.routing_id = sid.encode()
        self.sock.plain_username = name.encode()
        self.sock.plain_password = f"secret-of-{name}-0123456789".encode()
        assert running.broker is not None
        self.sock.connect(f"tcp://127.0.0.1:{running.broker.ports[0]}")

    async def ask(self, body: p.Request | p.Send) -> p.Reply:
        await self.sock.send(p.encode(body))
        return await self.reply()

    async def reply(self) -> p.Reply:
        assert await self.sock.poll(5000), "no reply within 5 s"
        return p.decode_reply(await self.sock.recv())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[RunningBroker]:
    """A broker with small budgets and pages."""
    limits = Limits(heartbeat=5.0, rate=1000.0, burst=1000.0, request_rate=0.5, request_burst=4.0, page_size=2, max_rooms=3)
    running = await RunningBroker(tmp_path / "limited.db", limits).start()
    yield running
    await running.stop()


async def test_a_resend_after_a_restart_is_acked_with_the_original(broker: RunningBroker) -> None:
    """The line was stored, its ack lost, the broker restarted on the same SQLite file:
    the resend gets the original Stored (same seq, id, ts), and nothing is stored twice."""
    peer = RawPeer(broker, "alice", "alice-1")
    try:
        assert isinstance(await peer.ask(p.Hello(rid=1)), p.Welcome)
        assert isinstance(await peer.ask(p.Join(rid=2, room="dev")), p.Joined)
        line = p.Send(sid="alice-1", cid="cid-before-restart", text="only once", room="dev")
        first = await peer.ask(line)
        assert isinstance(first, p.Ack)
        (original,) = first.stored
    finally:
        peer.close()
    await broker.stop()
    await broker.start()
    assert ("alice", "cid-before-restart") in broker.core.dedup  # warmed up from storage
    head = broker.core.heads["dev"]
    peer = RawPeer(broker, "alice", "alice-2")
    try:
        assert isinstance(await peer.ask(p.Hello(rid=1)), p.Welcome)
        again = await peer.ask(p.Send(sid="alice-2", cid="cid-before-restart", text="only once", room="dev"))
        assert again == p.Ack(stored=[original])
        assert broker.core.heads["dev"] == head
        history = await peer.ask(p.History(rid=3, room="dev"))
        assert isinstance(history, p.HistoryReply)
        assert [m.cid for m in history.messages if m.kind == "text"] == ["cid-before-restart"]
        fresh = await peer.ask(p.Send(sid="alice-2", cid="cid-after-restart", text="new", room="dev"))
        assert isinstance(fresh, p.Ack) and fresh.stored[0].seq == head + 1
    finally:
        peer.close()


async def test_requests_beyond_the_budget_are_refused_with_the_wait(limited: RunningBroker) -> None:
    peer = RawPeer(limited, "alice", "alice-1")
    try:
        assert isinstance(await peer.ask(p.Hello(rid=1)), p.Welcome)
        for rid in (2, 3, 4):
            assert isinstance(await peer.ask(p.Ping(rid=rid)), p.Pong)
        refused = await peer.ask(p.Ping(rid=5))
        assert isinstance(refused, p.Error)
        assert (refused.code, refused.rid) == (p.ErrorCode.RATE_LIMITED, 5)
        assert 0 < refused.retry_after <= 2.0
        other = RawPeer(limited, "bob", "bob-1")  # another user has their own budget
        try:
            assert isinstance(await other.ask(p.Hello(rid=1)), p.Welcome)
        finally:
            other.close()
    finally:
        peer.close()


async def test_rooms_are_paged_and_the_rooms_cap_holds(tmp_path: Path) -> None:
    limits = Limits(heartbeat=HEARTBEAT, rate=0, page_size=2, max_rooms=3)
    running = await RunningBroker(tmp_path / "pages.db", limits).start()
    peers = [RawPeer(running, name, f"{name}-1") for name in ("alice", "bob")]
    try:
        for peer in peers:
            assert isinstance(await peer.ask(p.Hello(rid=1)), p.Welcome)
        alice, bob = peers
        for rid, room in enumerate(("c", "a", "b"), 2):
            assert isinstance(await alice.ask(p.Join(rid=rid, room=room)), p.Joined)
        refused = await alice.ask(p.Join(rid=9, room="d"))
        assert isinstance(refused, p.Error) and (refused.code, refused.rid) == (p.ErrorCode.LIMIT_REACHED, 9)
        assert isinstance(await bob.ask(p.Join(rid=2, room="d")), p.Joined)
        first = await bob.ask(p.Rooms(rid=3))
        assert first == p.RoomsReply(rid=3, rooms=[p.RoomInfo("a", 1, 1), p.RoomInfo("b", 1, 1)], more=True)
        rest = await bob.ask(p.Rooms(rid=4, after="b"))
        assert rest == p.RoomsReply(rid=4, rooms=[p.RoomInfo("c", 1, 1), p.RoomInfo("d", 1, 1)], more=False)
    finally:
        for peer in peers:
            peer.close()
        await running.stop()


def test_the_core_budgets_are_broker_settings(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """--max-rooms, --request-rate and --room-rate reach a real broker (flag, then env)."""
    import asyncio
    import subprocess
    import sys

    from tests.conftest import BrokerProcess
    from zchat.client import Client, ClientError

    bad = subprocess.run([sys.executable, "-m", "zchat", "broker", "--max-rooms", "0"], env=cli_env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "max_rooms" in bad.stderr
    env = dict(cli_env, ZCHAT_REQUEST_RATE="1000")
    proc = BrokerProcess(tmp_path / "h.db", env, "--heartbeat", str(HEARTBEAT), "--max-rooms", "2").start()
    try:
        async def body() -> str:
            async with Client(proc.endpoint, "alice", "secret-of-alice-0123456789") as alice:
                await alice.join("one")
                await alice.join("two")
                with pytest.raises(ClientError) as info:
                    await alice.join("three")
                return info.value.code

        assert asyncio.run(body()) == p.ErrorCode.LIMIT_REACHED
    finally:
        out = proc.stop()

    assert "max_rooms 2 per user" in out and "1000 requests/s per user" in out  # the limits in force, at start
    assert "Traceback" not in out  # (a departed peer's unsubscription once raised here)
